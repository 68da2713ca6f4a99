#!/usr/bin/env python3
"""Writes a container image as an OCI image-layout archive, without a
registry or an image builder, for `ctr images import`.

The image has one gzip layer made of the given directories (later ones win
where paths repeat) and single files, a config with the entry point, user,
environment and working directory, and an index whose
`io.containerd.image.name` annotation names the image, so containerd
registers it under exactly that name (give the fully qualified name the
kubelet asks for, e.g. docker.io/library/chorus-server:0.1.0).

The archive is reproducible: entries are sorted and their times and owners
fixed, so the same inputs give the same image digest.

    mkimage.py --name docker.io/library/chorus-server:0.1.0 --out server.tar \\
        --dir rootfs --file target/release/chorus-server:/usr/local/bin/chorus-server \\
        --entrypoint /usr/local/bin/chorus-server --user 65532:65532
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Same bytes for the same tree: no times, names of owners or pax extras."""
    info.mtime = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def tree(root: str):
    """(relative path, absolute path) of every entry below `root`, sorted,
    without the contents of dev/ (device nodes come from the runtime)."""
    entries = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        rel_top = os.path.relpath(top, root)
        if rel_top == "dev":
            dirs.clear()
            continue
        for name in dirs + sorted(files):
            rel = os.path.normpath(os.path.join(rel_top, name))
            entries.append((rel, os.path.join(top, name)))
    return sorted(entries)


def layer(dirs, files) -> bytes:
    entries = {}
    for d in dirs:
        for rel, path in tree(d):
            entries[rel] = (path, None)
    for spec in files:
        src, _, dest = spec.partition(":")
        if not dest.startswith("/"):
            sys.exit(f"mkimage: --file {spec}: the destination must be absolute")
        dest = dest.lstrip("/")
        parent = os.path.dirname(dest)
        while parent:  # parents of an added file, unless a --dir has them
            entries.setdefault(parent, (None, "dir"))
            parent = os.path.dirname(parent)
        entries[dest] = (src, "file")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel in sorted(entries):
            path, kind = entries[rel]
            if kind == "dir":
                info = tarfile.TarInfo(rel)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(fixed(info))
            elif kind == "file":
                info = tar.gettarinfo(path, arcname=rel)
                info.uid = info.gid = 0
                with open(path, "rb") as f:
                    tar.addfile(fixed(info), f)
            else:
                info = tar.gettarinfo(path, arcname=rel)
                if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
                    continue
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(fixed(info), f)
                else:
                    tar.addfile(fixed(info))
    return raw.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="fully qualified image name with tag")
    p.add_argument("--out", required=True, help="archive to write")
    p.add_argument("--dir", action="append", default=[], help="directory to copy to / (repeatable)")
    p.add_argument("--file", action="append", default=[], help="SRC:/DEST, one file (repeatable)")
    p.add_argument("--entrypoint", action="append", default=[], help="entry point word (repeatable)")
    p.add_argument("--cmd", action="append", default=[], help="default argument (repeatable)")
    p.add_argument("--env", action="append", default=[], help="K=V (repeatable)")
    p.add_argument("--user", default="", help="uid[:gid] the container runs as")
    p.add_argument("--workdir", default="/")
    a = p.parse_args()
    if ":" not in a.name.rsplit("/", 1)[-1]:
        sys.exit(f"mkimage: {a.name}: give a tag (images are imported, never pulled)")
    for d in a.dir:
        if not os.path.isdir(d):
            sys.exit(f"mkimage: --dir {d}: not a directory")
    for spec in a.file:
        src = spec.partition(":")[0]
        if not os.path.isfile(src) or not os.stat(src).st_mode & stat.S_IRUSR:
            sys.exit(f"mkimage: --file {spec}: {src} is not a readable file")

    raw = layer(a.dir, a.file)
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [f"PATH={PATH}"] + a.env, "WorkingDir": a.workdir},
        "rootfs": {"type": "layers", "diff_ids": [digest(raw)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/cluster/mkimage.py"}],
    }
    if a.entrypoint:
        config["config"]["Entrypoint"] = a.entrypoint
    if a.cmd:
        config["config"]["Cmd"] = a.cmd
    if a.user:
        config["config"]["User"] = a.user
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER, "digest": digest(gz), "size": len(gz)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": digest(manifest_bytes),
            "size": len(manifest_bytes),
            "annotations": {
                "io.containerd.image.name": a.name,
                "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[1],
            },
        }],
    }
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as out:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index, sort_keys=True).encode())
        for blob in (config_bytes, manifest_bytes, gz):
            put("blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    os.replace(tmp, a.out)
    print(f"{a.name} {digest(manifest_bytes)} ({len(gz) // 1024} KiB compressed)")


if __name__ == "__main__":
    main()
