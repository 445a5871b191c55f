"""Write ``service/student_catalogue.json``: the facts of every ``tv:`` and ``timm:`` student.

The API checks students at submit without torch; it reads this catalogue (names, parameter
counts, pooled width, input sizes). Run this after upgrading torchvision or timm (the unit
test ``tests/unit/test_student_catalogue.py`` fails until the catalogue matches them)::

    python scripts/student_catalogue.py            # about half an hour on two cores

Every architecture is built on PyTorch's meta device (see ``bird_core/catalogue.py``);
one that cannot be built is listed under ``unbuildable`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bird_core.catalogue import ArchitectureFacts, describe_architecture, registry_names  # noqa: E402

OUT = ROOT / "service" / "student_catalogue.json"


def _describe(name: str) -> tuple[str, list | None, str]:
    """One catalogue row (in a pool process): the facts, or why the architecture cannot be
    built (recorded, not fatal)."""
    warnings.filterwarnings("ignore")
    try:
        return name, describe_architecture(name).as_list(), ""
    except Exception as error:
        return name, None, " ".join(f"{type(error).__name__}: {error}".split())[:200]


def main() -> None:
    """Describe every registered architecture and write the catalogue."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=2, help="processes building networks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import timm
    import torch
    import torchvision

    catalogue: dict = {
        "format": "bird-student-catalogue",
        "format_version": 1,
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "torchvision": torchvision.__version__.split("+")[0],
            "timm": timm.__version__,
        },
        "fields": list(ArchitectureFacts.__dataclass_fields__),
        "tv": {},
        "timm": {},
        "unbuildable": {"tv": {}, "timm": {}},
    }
    started = time.monotonic()
    names = [f"{registry}:{arch}" for registry, archs in registry_names().items() for arch in archs]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for index, (name, facts, reason) in enumerate(pool.map(_describe, names, chunksize=4)):
            registry, _, arch = name.partition(":")
            if facts is None:
                catalogue["unbuildable"][registry][arch] = reason
            else:
                catalogue[registry][arch] = facts
            if index % 50 == 0:
                elapsed = time.monotonic() - started
                print(f"{index}/{len(names)} {name} ({elapsed:.0f} s)", flush=True)
    text = json.dumps(catalogue, separators=(",", ":"), sort_keys=False)
    # One architecture per line: diffs after an upgrade stay readable.
    text = text.replace('],"', '],\n"')
    args.out.write_text(text + "\n")
    unbuildable = sum(len(v) for v in catalogue["unbuildable"].values())
    print(
        f"wrote {args.out}: {len(catalogue['tv'])} tv, {len(catalogue['timm'])} timm, "
        f"{unbuildable} unbuildable, {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
