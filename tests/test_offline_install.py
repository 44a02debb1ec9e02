"""`make wheelhouse` and `make install-offline`: omnienc installs with pip --no-index.

The slow test builds the wheelhouse (cached under ~/.cache/omnienc-wheelhouse-test, keyed by the
hash of constraints.txt, pyproject.toml and .ci/wheelhouse.py, so a machine downloads once),
makes a fresh venv that "already has a CUDA torch" (torch, torchvision and their dependency
closure from this venv, visible through a .pth file pointing at a folder of symlinks, nothing
copied), then installs into it with `make install-offline`, with the network cut when
`unshare -rn` is allowed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def _offline_env() -> dict[str, str]:
    """No pip configuration at all (this machine's adds find-links and indexes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _no_network() -> list[str]:
    """A command prefix that runs without any network interface, when the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


def _make(
    *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), "make", "--no-print-directory", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_install_offline_names_a_missing_wheel_folder(tmp_path: Path):
    missing = tmp_path / "no-such-wheelhouse"
    proc = _make("install-offline", f"WHEELS={missing}", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode != 0
    assert f"wheel folder '{missing}' does not exist" in proc.stderr
    assert "make wheelhouse" in proc.stderr


def test_install_offline_is_no_index_and_wheelhouse_leaves_torch_out():
    plan = _make("-n", "install-offline", "wheelhouse", "WHEELS=/w").stdout
    (install,) = [line for line in plan.splitlines() if " pip install " in line]
    assert '--no-index --find-links /w -c /w/constraints.txt -e "."' in install
    (wheel,) = [line for line in plan.splitlines() if " pip wheel " in line]
    assert "--no-deps" in wheel and "-r /w/requirements.txt" in wheel


def _torch_closure() -> list[metadata.Distribution]:
    """torch, torchvision and everything they require in this venv: the user's CUDA torch."""
    todo = [("torch", frozenset[str]()), ("torchvision", frozenset[str]())]
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = metadata.distribution(name)
        seen[canonicalize_name(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ("", *extras)]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, frozenset(req.extras)))
    return list(seen.values())


def _link_cuda_torch(folder: Path) -> list[str]:
    """Symlink each top-level entry of the torch closure's distributions (and their dist-info)."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    names: list[str] = []
    for dist in _torch_closure():
        names.append(canonicalize_name(dist.metadata["Name"]))
        for file in dist.files or []:
            top = Path(str(file)).parts[0]
            if top in ("..", "__pycache__") or (folder / top).is_symlink():
                continue
            assert (site / top).exists(), f"{top} of {dist.metadata['Name']} is not in {site}"
            (folder / top).symlink_to(site / top)
    return names


def _wheelhouse() -> Path:
    """The wheelhouse for this constraints.txt and pyproject.toml, built once per machine."""
    inputs = ("constraints.txt", "pyproject.toml", ".ci/wheelhouse.py")
    key = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in inputs)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    wheels = cache / "omnienc-wheelhouse-test" / key
    if not (wheels / "requirements.txt").exists():
        partial = wheels.with_name(f"{key}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        proc = _make("wheelhouse", f"WHEELS={partial}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if wheels.exists():  # another run finished first
            shutil.rmtree(partial)
        else:
            partial.rename(wheels)
    return wheels


@pytest.mark.slow
def test_offline_install_into_a_fresh_venv_with_a_cuda_torch(tmp_path: Path):
    wheels = _wheelhouse()
    pinned = {
        line.split("==")[0] for line in (wheels / "requirements.txt").read_text().splitlines()
    }
    assert {"monai", "timm", "lightly", "medmnist", "setuptools", "wheel"} <= pinned
    assert not [n for n in pinned if TORCH_FAMILY.match(n)]
    assert not [w.name for w in wheels.glob("*.whl") if TORCH_FAMILY.match(w.name.split("-")[0])]
    assert not [n for n in pinned if n in {"pytest", "mypy", "ruff"}], "runtime only by default"
    assert not list(wheels.glob("*.tar.gz")) and not list(wheels.glob("*.zip"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    linked = _link_cuda_torch(tmp_path / "cuda-torch")
    (Path(purelib) / "cuda_torch.pth").write_text(f"{tmp_path / 'cuda-torch'}\n")
    assert {"torch", "torchvision", "triton"} <= set(linked)

    env, offline = _offline_env(), _no_network()
    # One wheel missing: pip must fail on it rather than fetch it.
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in wheels.iterdir():
        if not f.name.startswith("monai-"):
            (partial / f.name).symlink_to(f)
    proc = _make("install-offline", f"VENV={venv}", f"WHEELS={partial}", env=env)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr  # pip 23 reports a conflict with the pin, newer pips no match
    assert re.search(r"(no matching distribution found for|\(constraint\)) monai", said, re.I), said
    assert f"pip could not install from '{partial}' alone" in proc.stderr

    proc = _make("install-offline", f"VENV={venv}", f"WHEELS={wheels}", env=env, prefix=offline)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "--no-index" in proc.stdout
    assert "Downloading" not in proc.stdout + proc.stderr
    assert "installed offline: torch 2." in proc.stdout
    assert (venv / ".omnienc-installed").exists()

    code = (
        "import omnienc, omnienc.pretext, omnienc.adapters, monai, timm, lightly, torch\n"
        "print(omnienc.__file__, monai.__file__, torch.__file__, sep='\\n')"
    )
    out = subprocess.run(
        [*offline, py, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout.split()
    assert Path(out[0]).is_relative_to(REPO), "omnienc is the editable checkout"
    assert Path(out[1]).is_relative_to(venv), "monai came from the wheelhouse into the new venv"
    assert Path(out[2]).is_relative_to(tmp_path / "cuda-torch"), "torch is the user's, untouched"
    help_ = subprocess.run(
        [*offline, venv / "bin" / "omnienc", "--help"], capture_output=True, text=True, env=env
    )
    assert help_.returncode == 0, help_.stderr
    assert "pretrain" in help_.stdout
