"""The contract is only a contract (issue 10): its core imports no Redis client and no arq, and the
relay, which takes the contract's ``[redis]`` extra, installs no arq.

``rapidphoto_contract.redis_options`` and ``.redis_cancel`` are the optional part (the extra
``rapidphoto-contract[redis]``): the one Redis connection policy of the relay, the worker and the
tools. Every other module is the core, which needs attrs and PyJWT (with cryptography) alone.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import rapidphoto_contract

ROOT = Path(__file__).resolve().parents[2]
#: The optional part: importing these needs the ``redis`` extra.
REDIS_MODULES = frozenset({"rapidphoto_contract.redis_options", "rapidphoto_contract.redis_cancel"})
FORBIDDEN_IN_CORE = ("redis", "arq", "hiredis")


def contract_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules(rapidphoto_contract.__path__, "rapidphoto_contract.")
    )


def core_modules() -> list[str]:
    return [name for name in contract_modules() if name not in REDIS_MODULES]


_IMPORT_AND_LIST = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_after_importing(modules: list[str]) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules`` (nothing else imported)."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_LIST, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(done.stdout))


def top_level(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_the_core_is_everything_but_the_redis_modules() -> None:
    names = set(contract_modules())
    assert names >= REDIS_MODULES
    core = set(core_modules())
    assert core >= {"rapidphoto_contract.jobs", "rapidphoto_contract.settings"}
    assert core | REDIS_MODULES == names


def test_no_core_module_imports_redis_or_arq() -> None:
    loaded = top_level(loaded_after_importing(core_modules()))
    assert "rapidphoto_contract" in loaded
    assert not set(FORBIDDEN_IN_CORE) & loaded


@pytest.mark.parametrize("module", sorted(REDIS_MODULES))
def test_the_redis_modules_need_redis_but_not_arq(module: str) -> None:
    loaded = top_level(loaded_after_importing([module]))
    assert "redis" in loaded
    assert "arq" not in loaded


# --- what each package installs, as uv.lock resolves it ---------------------------------------------


def lock_packages() -> dict[str, dict[str, object]]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package for package in lock["package"]}


def installed_with(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every package ``uv sync --package name`` installs (no dev group): the closure in uv.lock."""
    packages = lock_packages()
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(name, extras)]
    while todo:
        current, wanted = todo.pop()
        package = packages[current]
        deps = list(package.get("dependencies", []))  # type: ignore[call-overload]
        optional: dict[str, list[dict[str, object]]] = package.get(  # type: ignore[assignment]
            "optional-dependencies", {}
        )
        for extra in wanted:
            deps.extend(optional[extra])
        seen.add(current)
        for dep in deps:
            dep_extras = tuple(dep.get("extra", ()))
            if dep["name"] not in seen or dep_extras:
                todo.append((dep["name"], dep_extras))
    return seen


def test_the_contract_core_installs_no_redis_and_no_arq() -> None:
    core = installed_with("rapidphoto-contract")
    assert {"attrs", "pyjwt", "cryptography"} <= core
    assert not set(FORBIDDEN_IN_CORE) & core
    assert "redis" in installed_with("rapidphoto-contract", ("redis",))


def test_the_relay_installs_no_arq() -> None:
    relay = installed_with("rapidphoto-relay")
    assert {"rapidphoto-contract", "redis", "litestar"} <= relay
    assert "arq" not in relay
    assert "rapidphoto-tools" not in relay


def test_the_worker_and_the_tools_take_arq_themselves() -> None:
    assert "arq" in installed_with("rapidphoto-worker")
    tools = installed_with("rapidphoto-tools")
    assert {"arq", "redis", "rapidphoto-contract"} <= tools
    assert not {"rapidphoto-relay", "rapidphoto-worker"} & tools
