#!/usr/bin/env python3
"""Pin the wheelhouse: every package an omnienc install needs, less torch's CUDA stack.

`make wheelhouse` runs this, then `pip wheel --no-deps -r OUT/requirements.txt -w OUT`. It asks
pip's resolver (`pip install --dry-run --ignore-installed --report`, metadata only: no wheel of
torch is downloaded) what a fresh `pip install -c CONSTRAINTS .[EXTRAS]` would install, plus the
build backend from pyproject.toml's [build-system] (an offline editable install builds omnienc),
and writes into OUT:

- requirements.txt: name==version for each of them, less omnienc itself and the torch family
  (torch, torchvision, triton, nvidia-*, cuda-*), which belong to the user's CUDA torch;
- constraints.txt: CONSTRAINTS less the torch family, for `make install-offline`, so any CUDA
  torch build the user installed is accepted while every other package stays pinned.

Needs network (it is the internet-side half) and pip >= 22.2. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The user's CUDA torch brings these; their wheels are CUDA-specific and gigabytes.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_requires() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's vendored copy
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["build-system"]["requires"])


def resolve(constraints: Path, extras: str) -> dict[str, str]:
    """canonical name -> version of everything a fresh install would put in the environment."""
    target = str(REPO) + (f"[{extras}]" if extras else "")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
        cmd += ["--report", str(report), "-c", str(constraints), target, *build_requires()]
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the wheelhouse folder")
    ap.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    ap.add_argument("--extras", default="", help="omnienc extras to include, e.g. dev")
    args = ap.parse_args(argv)

    pins = resolve(args.constraints, args.extras)
    keep = {n: v for n, v in sorted(pins.items()) if n != "omnienc" and not TORCH_FAMILY.match(n)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in keep.items()))
    lines = args.constraints.read_text().splitlines()
    kept_lines = [
        line
        for line in lines
        if not TORCH_FAMILY.match(canonical(re.split(r"[=<>!~;\s\[]", line.strip(), maxsplit=1)[0]))
    ]
    (args.out / "constraints.txt").write_text("\n".join(kept_lines) + "\n")
    dropped = sorted(n for n in pins if TORCH_FAMILY.match(n))
    print(
        f"{len(keep)} packages pinned in {args.out}/requirements.txt; left to your torch: "
        + ", ".join(dropped)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
