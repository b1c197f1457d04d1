"""The README's set-up works on a fresh clone: its commands, read from README.md, as a student runs them.

The committed state (HEAD) is cloned into a temporary folder, with nothing but the system's
`python3` and `make`: no virtual environment active, no Jupyter configuration or kernels of the
user's (Jupyter's config/data/runtime folders point into the temporary folder). Then every
command of the README's "Set up" code block runs there:

* `make lab` runs exactly as written, no arguments added (as root too: CI runs as root, and
  JupyterLab refuses root unless the Makefile says --allow-root): it must create `.venv/`, install
  everything and serve JupyterLab, which must answer on its REST API at the address and token it
  prints; then it is stopped. No browser is opened: the machine has no display.
* `make test`, also exactly as written, would run this very file again inside the clone (and that
  clone's test would clone again...), and the full suite is what CI already runs on its own fresh
  clone. So the environment (not the command line) sets `PYTEST_ARGS=--collect-only -q`, the
  Makefile's documented knob: the README's command through the Makefile proves that the
  environment `make lab` built needs no further installing (`make -q install`) and that every test
  module and notebook is collected (imports resolve) in the new venv.
* In the new venv, a kernel starts through jupyter_client under the kernelspec name the
  notebooks use (`python3`), imports moe_lab from the clone, and runs a tiny MoE block.
* Set-up leaves `git status` clean: everything it writes is git-ignored.

torch is installed exactly as the README says (the Makefile's default `TORCH`, `torch>=2.9`),
unless TORCH is set in the environment, which the README documents as the way to choose the
build (.ci/run passes it through the same way). That install is the slow part: a few minutes and
several GB for the CUDA build. So the test is marked `slow` and runs only in CI (CI=true) or when
asked for (MOE_LAB_FRESH_MACHINE=1); MOE_LAB_FRESH_MACHINE=0 skips it even in CI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INSTALL_S = 1800  # venv + torch (CUDA build: several GB) + the extras, on a slow CI machine
LAB_START_S = 120  # after the install: JupyterLab's first start

def _wanted() -> tuple[bool, str]:
    flag = os.environ.get("MOE_LAB_FRESH_MACHINE", "")
    if flag == "0":
        return False, "MOE_LAB_FRESH_MACHINE=0"
    if flag == "1" or os.environ.get("CI", "").lower() == "true":
        return True, ""
    return False, ("fresh-machine set-up (clone + README's make lab/make test, a few minutes and several GB "
                   "for torch) runs only in CI (CI=true) or with MOE_LAB_FRESH_MACHINE=1")


def readme_setup_commands(text: str | None = None) -> list[str]:
    """The commands of the first ```bash block under the README's "## Set up" heading, comments dropped."""
    text = README.read_text() if text is None else text
    section = re.search(r"^## Set up\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README.md has no '## Set up' section"
    block = re.search(r"```(?:bash|sh|shell|console)?\n(.*?)```", section.group(1), flags=re.S)
    assert block, "README.md's '## Set up' section has no code block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c]


def test_readme_setup_block_is_parsed():
    """Cheap and always run: the block this file executes is still there and still `make <target>`s."""
    commands = readme_setup_commands()
    assert commands == ["make lab", "make test"], commands
    assert readme_setup_commands("## Set up\n\n```bash\nmake lab  # x\n\nmake test\n```\n## Next\n") == \
        ["make lab", "make test"]


# --------------------------------------------------------------------------------------------- #
# The fresh machine
# --------------------------------------------------------------------------------------------- #


def _fresh_env(home: Path) -> dict[str, str]:
    """This process's environment minus everything that says "a venv / a make is already running"."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.prefix) / "bin")
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
                "PYTHON", "VENV", "EXTRAS", "PYTEST_ARGS", "LAB_ARGS", "BIN", "STAMP", "JUPYTER_TOKEN",
                "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve())
    for name, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                      ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float, what: str) -> str:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    print(f"[fresh machine] {what}: {time.monotonic() - start:.0f} s, exit {proc.returncode}")
    assert proc.returncode == 0, f"{what} failed ({' '.join(cmd)}), exit {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def _log_tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _stop(proc: subprocess.Popen) -> None:
    """make and the JupyterLab it started share a process group of their own: SIGTERM it, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


#: What JupyterLab prints when it serves: "http://127.0.0.1:8888/lab?token=..." (or localhost).
SERVING_URL = re.compile(r"(http://(?:127\.0\.0\.1|localhost):(\d+))/lab\?token=([0-9a-f]+)")


def run_make_lab(clone: Path, env: dict, log: Path) -> None:
    """README: `make lab`, exactly. Install from nothing, then JupyterLab must answer at the address
    it printed; always stopped afterwards."""
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(["make", "lab"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            installed_at = None
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"`make lab` exited with {proc.returncode} before JupyterLab answered:\n"
                                f"{_log_tail(log)}")
                if installed_at is None and (clone / ".venv" / ".installed").exists():
                    installed_at = time.monotonic()
                    print(f"[fresh machine] make lab: set-up done after {installed_at - start:.0f} s")
                limit = INSTALL_S if installed_at is None else LAB_START_S
                if time.monotonic() - (installed_at or start) > limit:
                    pytest.fail(f"`make lab` did not {'finish installing' if installed_at is None else 'serve'} "
                                f"within {limit} s:\n{_log_tail(log)}")
                serving = SERVING_URL.search(log.read_text(errors="replace")) if installed_at else None
                if serving:
                    url, token = serving.group(1), serving.group(3)
                    try:
                        req = urllib.request.Request(f"{url}/api/kernelspecs",
                                                     headers={"Authorization": f"token {token}"})
                        with urllib.request.urlopen(req, timeout=5) as resp:
                            specs = json.load(resp)
                        break
                    except (urllib.error.URLError, ConnectionError, OSError):
                        pass
                time.sleep(1)
            print(f"[fresh machine] make lab: JupyterLab answered at {url} after {time.monotonic() - start:.0f} s")
            assert "python3" in specs["kernelspecs"], f"JupyterLab has no python3 kernel: {specs}"
            with urllib.request.urlopen(f"{url}/lab?token={token}", timeout=10) as resp:
                assert resp.status == 200 and b"JupyterLab" in resp.read()
        finally:
            _stop(proc)


KERNEL_CHECK = textwrap.dedent("""\
    import json
    from jupyter_client.manager import start_new_kernel

    CODE = '''
    import json, sys, torch, moe_lab
    block = moe_lab.SparseMoeBlock(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2))
    out = block(torch.randn(5, 32))
    print(json.dumps(dict(prefix=sys.prefix, moe_lab=moe_lab.__file__, shape=list(out.shape),
                          torch=torch.__version__)))
    '''
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        printed = []
        reply = kc.execute_interactive(CODE, timeout=120, output_hook=lambda m: printed.append(m))
        status = reply["content"]["status"]
        text = "".join(m["content"].get("text", "") for m in printed if m["msg_type"] == "stream")
        errors = [m["content"] for m in printed if m["msg_type"] == "error"]
        print(json.dumps(dict(status=status, text=text, errors=errors, spec=km.kernel_spec.resource_dir)))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
""")


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_S + 900)
@pytest.mark.skipif(not _wanted()[0], reason=_wanted()[1])
def test_readme_setup_on_a_fresh_clone(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.fail("a fresh machine per the README needs make (and git to clone); neither may be missing in CI")
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: nothing to clone")
    commands = readme_setup_commands()
    unknown = [c for c in commands if c not in ("make lab", "make test")]
    assert not unknown, f"README's set-up has commands this test does not know how to run: {unknown}"

    clone, home = tmp_path / "clone", tmp_path / "home"
    env = _fresh_env(home)
    python3 = shutil.which("python3", path=env["PATH"])
    assert python3, "no python3 on PATH (outside this venv): the README's only requirement besides make"
    _run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], tmp_path, env, 300, "git clone")
    print(f"[fresh machine] clone of {_run(['git', 'rev-parse', 'HEAD'], clone, env, 30, 'rev-parse').strip()}, "
          f"python3 = {python3}, TORCH = {env.get('TORCH', '(Makefile default)')}")
    assert not (clone / ".venv").exists()
    try:
        _set_up_and_check(clone, tmp_path, env, commands)
    finally:
        # pytest keeps the last three runs' tmp_path: without this, ~6 GB of venv each.
        shutil.rmtree(clone, ignore_errors=True)


def _set_up_and_check(clone: Path, tmp_path: Path, env: dict, commands: list[str]) -> None:
    for command in commands:
        if command == "make lab":
            run_make_lab(clone, env, tmp_path / "make-lab.log")
        elif command == "make test":
            if (clone / ".venv" / ".installed").exists():
                # After `make lab` nothing is left to install: `make test` goes straight to pytest ...
                _run(["make", "-q", "install"], clone, env, 60, "make -q install (set-up up to date)")
            # ... which collects every test module and notebook in the new venv
            # (see the docstring for why it does not run them here).
            out = _run(["make", "test"], clone, {**env, "PYTEST_ARGS": "--collect-only -q"}, 600,
                       "make test (PYTEST_ARGS=--collect-only -q in the environment)")
            assert re.search(r"\d+ tests? collected", out), out[-3000:]  # exit 0: no collection error

    venv_python = clone / ".venv" / "bin" / "python"
    assert venv_python.exists(), "set-up did not create .venv/"
    # Run from outside the clone: moe_lab must come through the venv's (editable) install, not the cwd.
    out = _run([str(venv_python), "-c", KERNEL_CHECK], tmp_path, env, 300, "kernel start (jupyter_client)")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "ok" and not result["errors"], result
    kernel = json.loads(result["text"].strip().splitlines()[-1])
    assert Path(kernel["prefix"]).resolve() == (clone / ".venv").resolve(), kernel
    assert Path(kernel["moe_lab"]).resolve().is_relative_to(clone.resolve()), kernel  # editable, from the clone
    assert kernel["shape"] == [5, 32], kernel
    assert Path(result["spec"]).resolve().is_relative_to((clone / ".venv").resolve()), (
        f"kernel python3 came from {result['spec']}, not from the clone's venv")
    print(f"[fresh machine] kernel: torch {kernel['torch']}, moe_lab from {kernel['moe_lab']}")

    status = _run(["git", "status", "--porcelain"], clone, env, 60, "git status")
    assert not status.strip(), f"set-up left files that are not git-ignored:\n{status}"
