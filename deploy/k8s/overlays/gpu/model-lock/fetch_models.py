"""Install the model weights of models.lock.json into versioned directories, verified.

Run by the Job `models` (and, with --wait, by the pods' init container) from
the ConfigMap `models-fetch`; runnable by hand too. Each lock entry names a
directory (`name`), a version label (`version`), the ModelScope model id and
revision to fetch, and the sha256 of every file. A model is installed into
`<root>/<name>/<version>/` only once every file matches, with a `.verified`
marker holding the entry's digest; a directory of a version is never changed
afterwards, so pods reading it never see a partial download. Nothing is
trusted on first use: an entry without a revision or file hashes is refused
(the error lists the hashes of what was fetched, to review and pin).

    fetch_models.py LOCK ROOT                 download what is missing, verify, install
    fetch_models.py LOCK ROOT --source DIR    the same from DIR/<name>/ (no network)
    fetch_models.py LOCK ROOT --wait N        exit 0 once all are installed (N s at most)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARKER = ".verified"


def entry_digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed(root: Path, entry: dict[str, Any]) -> bool:
    marker = root / entry["name"] / entry["version"] / MARKER
    return marker.is_file() and marker.read_text().strip() == entry_digest(entry)


def hashes_of(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): sha256_of(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def fetch(entry: dict[str, Any], into: Path, source: Path | None) -> None:
    if source is not None:
        shutil.copytree(source / entry["name"], into, dirs_exist_ok=True)
        return
    from modelscope.hub.snapshot_download import snapshot_download

    snapshot_download(entry["id"], revision=entry["revision"], local_dir=str(into))


def install(root: Path, entry: dict[str, Any], source: Path | None) -> None:
    name, version = entry["name"], entry["version"]
    if installed(root, entry):
        print(f"{name}/{version}: present and verified")
        return
    target = root / name / version
    if target.exists():
        raise SystemExit(f"{name}/{version}: exists without a matching {MARKER}; remove it")
    (root / name).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".incoming-{version}-", dir=root / name) as tmp:
        incoming = Path(tmp) / "model"
        if not entry.get("revision") and source is None:
            raise SystemExit(f"{name}: no revision in the lock; pin one")
        fetch(entry, incoming, source)
        got = hashes_of(incoming)
        wanted: dict[str, str] = entry.get("files", {})
        if not wanted:
            listing = json.dumps(got, indent=2, sort_keys=True)
            raise SystemExit(f"{name}: the lock has no file hashes; fetched:\n{listing}")
        wrong = {f: got.get(f, "missing") for f, h in wanted.items() if got.get(f) != h}
        if wrong:
            raise SystemExit(f"{name}/{version}: checksum mismatch: {json.dumps(wrong)}")
        for stray in set(got) - set(wanted):
            (incoming / stray).unlink()
        (incoming / MARKER).write_text(entry_digest(entry) + "\n")
        incoming.rename(target)
    print(f"{name}/{version}: installed from {entry['id']}@{entry.get('revision', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("--source", type=Path, help="copy from DIR/<name>/ instead")
    parser.add_argument("--wait", type=float, help="only wait until all are installed")
    args = parser.parse_args()
    models: list[dict[str, Any]] = json.loads(args.lock.read_text())["models"]
    if args.wait is not None:
        deadline = time.monotonic() + args.wait
        while not all(installed(args.root, m) for m in models):
            if time.monotonic() > deadline:
                sys.exit("models not installed in time; is the Job `models` done?")
            print("waiting for the Job `models`", flush=True)
            time.sleep(10)
        return
    for entry in models:
        install(args.root, entry, args.source)


if __name__ == "__main__":
    main()
