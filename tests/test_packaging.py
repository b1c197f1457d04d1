"""The three ways of installing moe_lab must not drift apart.

pyproject.toml declares the package and its extras, the Makefile installs it
into .venv (``make lab`` / ``make test``), and environment.yml installs it for
conda users. These tests read all three files and fail, saying what drifted,
when they disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"
ENVIRONMENT = ROOT / "environment.yml"

# `-e .[a,b]`, `-e ".[a,b]"`, `-e '.[a,b]'`; the path and the extras are captured.
EDITABLE_RE = re.compile(r"""-e\s+(["']?)(?P<path>[^\s"'\[]+)\[(?P<extras>[^\]]*)\]\1""")
MAKE_ASSIGN_RE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|::)?=\s*(?P<value>.*?)\s*$")
MAKE_VAR_RE = re.compile(r"\$[({](?P<name>[A-Za-z_][A-Za-z0-9_]*)[)}]")


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def environment() -> dict:
    with ENVIRONMENT.open() as f:
        env = yaml.safe_load(f)
    assert isinstance(env, dict), f"{ENVIRONMENT.name} is not a YAML mapping"
    return env


def _make_variables(text: str) -> dict[str, str]:
    """Top-level variable assignments of a Makefile (comments stripped)."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("\t"):  # recipe line
            continue
        line = line.split("#", 1)[0]
        m = MAKE_ASSIGN_RE.match(line)
        if m:
            variables[m["name"]] = m["value"]
    return variables


def _expand(value: str, variables: dict[str, str], depth: int = 0) -> str:
    assert depth < 10, f"recursive Makefile variable in {value!r}"

    def sub(m: re.Match) -> str:
        name = m["name"]
        assert name in variables, f"Makefile uses $({name}) but never assigns it"
        return _expand(variables[name], variables, depth + 1)

    return MAKE_VAR_RE.sub(sub, value)


@pytest.fixture(scope="module")
def makefile() -> tuple[str, dict[str, str]]:
    text = MAKEFILE.read_text()
    return text, _make_variables(text)


def _split_extras(extras: str) -> list[str]:
    return [e.strip() for e in extras.split(",") if e.strip()]


@pytest.fixture(scope="module")
def make_install(makefile) -> tuple[str, list[str]]:
    """(path, extras) of the single editable install in the Makefile."""
    text, variables = makefile
    installs = [
        (m["path"], _split_extras(_expand(m["extras"], variables)))
        for line in text.splitlines()
        if "pip install" in line
        for m in EDITABLE_RE.finditer(_expand(line, variables))
    ]
    assert len(installs) == 1, (
        f"expected exactly one `pip install -e .[extras]` in {MAKEFILE.name}, found {installs}"
    )
    return installs[0]


@pytest.fixture(scope="module")
def env_pip(environment) -> list[str]:
    deps = environment.get("dependencies") or []
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, (
        f"{ENVIRONMENT.name} should have exactly one `pip:` section, found {len(pip_sections)}"
    )
    assert "pip" in deps, f"{ENVIRONMENT.name} has a `pip:` section but does not install pip itself"
    return [str(x) for x in pip_sections[0]]


@pytest.fixture(scope="module")
def env_install(env_pip) -> tuple[str, list[str]]:
    """(path, extras) of the editable install in environment.yml."""
    assert len(env_pip) == 1, (
        f"{ENVIRONMENT.name} pip section should install exactly this package "
        f"(one `-e .[extras]` line, like the Makefile), but lists {env_pip}"
    )
    m = EDITABLE_RE.fullmatch(env_pip[0].strip())
    assert m, f"{ENVIRONMENT.name} pip entry {env_pip[0]!r} is not of the form `-e .[extras]`"
    return m["path"], _split_extras(m["extras"])


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_environment_installs_the_same_package_and_extras_as_makefile(make_install, env_install):
    make_path, make_extras = make_install
    env_path, env_extras = env_install

    # Both files sit next to pyproject.toml, so "." must mean this project.
    assert (ROOT / make_path).resolve() == ROOT, (
        f"Makefile installs {make_path!r}, which is not the project root holding pyproject.toml"
    )
    assert (ENVIRONMENT.parent / env_path).resolve() == ROOT, (
        f"{ENVIRONMENT.name} installs {env_path!r}, which is not the project root"
    )

    assert len(set(make_extras)) == len(make_extras), f"Makefile repeats an extra: {make_extras}"
    assert len(set(env_extras)) == len(env_extras), f"{ENVIRONMENT.name} repeats an extra: {env_extras}"
    only_make = sorted(set(make_extras) - set(env_extras))
    only_env = sorted(set(env_extras) - set(make_extras))
    assert not (only_make or only_env), (
        "extras drifted between Makefile and environment.yml: "
        f"only in Makefile {only_make}, only in environment.yml {only_env} "
        f"(Makefile: {make_extras}, environment.yml: {env_extras})"
    )


def test_referenced_extras_exist_in_pyproject(pyproject, make_install, env_install):
    declared = set(pyproject["project"].get("optional-dependencies", {}))
    for source, (_, extras) in (("Makefile", make_install), (ENVIRONMENT.name, env_install)):
        unknown = sorted(set(extras) - declared)
        assert not unknown, (
            f"{source} installs extras {unknown} that pyproject.toml does not declare "
            f"(declared: {sorted(declared)}); pip would silently ignore them"
        )


def _conda_python_version(environment) -> tuple[str, str]:
    """(operator, version) of the `python` entry in environment.yml."""
    specs = [
        d for d in environment.get("dependencies") or []
        if isinstance(d, str) and re.match(r"python(\s|[=<>!]|$)", d)
    ]
    assert len(specs) == 1, f"{ENVIRONMENT.name} should pin python exactly once, found {specs}"
    m = re.fullmatch(r"python\s*(?P<op>==|=|>=)?\s*(?P<ver>\d+(?:\.\d+)*)(?:\.\*)?", specs[0].strip())
    assert m and m["op"], (
        f"cannot read the python version from {specs[0]!r} in {ENVIRONMENT.name}; "
        "use e.g. `python=3.11`"
    )
    return m["op"], m["ver"]


def test_environment_python_satisfies_requires_python(pyproject, environment):
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    op, ver = _conda_python_version(environment)
    # conda's `python=3.11` means any 3.11.x, `>=3.11` anything above: the
    # lowest version it may pick is X.Y.0, and that must be allowed.
    lowest = Version(ver + ".0" * max(0, 3 - len(ver.split("."))))
    assert requires.contains(lowest), (
        f"{ENVIRONMENT.name} asks for python{op}{ver}, which may give Python {lowest}, "
        f"but pyproject.toml has requires-python = {str(requires)!r}"
    )


def _requirements(reqs: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(r) for r in reqs]
    return {canonicalize_name(r.name): r for r in parsed}


def test_dev_extra_is_the_union_of_the_other_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert "dev" in extras, "pyproject.toml has no `dev` extra"
    others: dict[str, Requirement] = {}
    for name, reqs in extras.items():
        if name != "dev":
            for key, req in _requirements(reqs).items():
                others.setdefault(key, req)
    dev = _requirements(extras["dev"])
    missing = sorted(set(others) - set(dev))
    extra_in_dev = sorted(set(dev) - set(others))
    assert not missing, f"`dev` extra lacks {missing}, which other extras install"
    assert not extra_in_dev, f"`dev` extra installs {extra_in_dev}, which no other extra has"
    different = {
        k: (str(dev[k]), str(others[k])) for k in dev if str(dev[k]) != str(others[k])
    }
    assert not different, f"`dev` pins differ from the other extras (dev, other): {different}"


def test_same_requirement_pinned_identically_across_extras(pyproject):
    seen: dict[str, tuple[str, str]] = {}
    for extra, reqs in pyproject["project"]["optional-dependencies"].items():
        for key, req in _requirements(reqs).items():
            if key in seen:
                other_extra, other = seen[key]
                assert str(req) == other, (
                    f"{key} is {other!r} in extra {other_extra!r} but {str(req)!r} in {extra!r}"
                )
            else:
                seen[key] = (extra, str(req))


def test_makefile_torch_default_matches_pyproject(pyproject, makefile):
    _, variables = makefile
    assert "TORCH" in variables, "Makefile has no TORCH variable"
    make_torch = Requirement(_expand(variables["TORCH"], variables))
    deps = _requirements(pyproject["project"]["dependencies"])
    assert "torch" in deps, "pyproject.toml does not depend on torch"
    assert canonicalize_name(make_torch.name) == "torch", (
        f"Makefile TORCH default {str(make_torch)!r} is not a torch requirement"
    )
    assert make_torch.specifier == deps["torch"].specifier, (
        f"Makefile installs {str(make_torch)!r} by default but pyproject.toml requires "
        f"{str(deps['torch'])!r}"
    )


def test_every_data_file_in_the_package_ships_with_the_wheel(pyproject):
    # A file under moe_lab/ that is not Python reaches a wheel only through package-data: the real
    # models' configs (moe_lab/hf/configs/*.json) would be missing from an installed moe_lab without it.
    from fnmatch import fnmatch

    package_data = pyproject["tool"]["setuptools"].get("package-data", {})
    data_files = [path for path in (ROOT / "moe_lab").rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts]
    assert data_files, "expected the shipped configs under moe_lab/hf/configs"
    missing = []
    for path in data_files:
        relative = path.relative_to(ROOT)
        shipped = any(
            fnmatch(str(relative.relative_to(Path(*package.split(".")))), pattern)
            for package, patterns in package_data.items() if relative.is_relative_to(Path(*package.split(".")))
            for pattern in patterns
        )
        if not shipped:
            missing.append(str(relative))
    assert not missing, f"not covered by [tool.setuptools.package-data] in pyproject.toml: {missing}"
