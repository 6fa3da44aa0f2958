"""Read the deployment files the way their tools do: compose's interpolation, .dockerignore, Dockerfiles.

Kept small and explicit; each function names the rule it follows.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Deployable -> (its package directory, its Dockerfile).
DEPLOYABLES = {
    "rapidphoto-worker": ROOT / "services" / "worker",
    "rapidphoto-relay": ROOT / "services" / "relay",
}


# --- compose ----------------------------------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, ``#`` comments; the subset of compose's .env format the example uses."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {raw!r}")
        values[key] = value
    return values


# Compose interpolation (compose spec, "Interpolation"): $$ is a literal $; ${VAR}, $VAR,
# ${VAR:-default} / ${VAR-default}, ${VAR:?error} / ${VAR?error}, ${VAR:+alt} / ${VAR+alt}.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def variables_in(text: str) -> set[str]:
    """Names ``text`` interpolates."""
    return {
        m.group("braced") or m.group("bare")
        for m in _INTERPOLATION.finditer(text)
        if not m.group("escaped")
    }


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _INTERPOLATION.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def interpolated_variables(node: Any) -> set[str]:
    """Names interpolated anywhere in a parsed compose document (values only, as compose does)."""
    if isinstance(node, str):
        return variables_in(node)
    if isinstance(node, list):
        return set().union(*(interpolated_variables(item) for item in node))
    if isinstance(node, dict):
        return set().union(*(interpolated_variables(value) for value in node.values()))
    return set()


def compose_raw() -> dict[str, Any]:
    """compose.yaml as YAML (anchors and ``<<`` merges resolved), before interpolation."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_resolved(env: Mapping[str, str]) -> dict[str, Any]:
    resolved: dict[str, Any] = _interpolate_tree(compose_raw(), env)
    return resolved


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment``, in either of compose's forms (mapping or ``KEY=VALUE`` list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- packages ---------------------------------------------------------------------------------


def console_scripts(package_dir: Path) -> dict[str, str]:
    data = tomllib.loads((package_dir / "pyproject.toml").read_text())
    scripts: dict[str, str] = data["project"].get("scripts", {})
    return scripts


def uv_version_of_setup() -> str:
    match = re.search(r'^UV_VERSION="([^"]+)"', (ROOT / "scripts" / "setup").read_text(), re.M)
    assert match, "scripts/setup pins no UV_VERSION"
    return match.group(1)


# --- .dockerignore ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerIgnore:
    """Docker's rules: patterns in order, ``!`` re-includes, the last match wins, and a pattern
    that matches a directory matches everything under it. ``*`` stays within one path segment,
    ``**`` spans any number of them."""

    patterns: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def read(cls, path: Path = DOCKERIGNORE) -> DockerIgnore:
        patterns = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            patterns.append((negate, _glob_regex(pattern.strip().strip("/"))))
        return cls(tuple(patterns))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in self.patterns:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negate
        return result

    def context_files(self, root: Path = ROOT) -> Iterator[Path]:
        """Files of the build context (those the patterns let through), relative to ``root``."""
        skip = {".git", ".venv", ".tools", "node_modules"}
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if relative.parts[0] in skip or not path.is_file():
                continue
            if not self.excluded(relative.as_posix()):
                yield relative


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


# --- Dockerfiles ----------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [value for name, value in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for value in self.all("ENV"):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                values[key] = val
        return values


def stages(dockerfile: Path) -> list[Stage]:
    """The Dockerfile's stages, parsed by dockerfile-parse, with their instructions in order."""
    parser = DockerfileParser(path=str(dockerfile))
    result: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(result))
            result.append(Stage(name=name, base=words[0]))
        elif instruction != "COMMENT":
            assert result, f"{dockerfile}: {instruction} before FROM"
            result[-1].instructions.append((instruction, value))
    return result


def run_argv(value: str) -> list[str]:
    """A shell-form RUN as words, BuildKit's ``--mount``-style flags dropped."""
    words = shlex.split(value)
    while words and words[0].startswith("--"):
        words.pop(0)
    return words


def matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern)
