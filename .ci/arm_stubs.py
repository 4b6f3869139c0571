"""Write the C source and linker version script of one stand-in library for the CUDA libraries that
PyPI's aarch64 torch wheel links against (it is a CUDA build; there is no aarch64 CPU wheel there).

usage: python3 arm_stubs.py SITE SYSROOT OUT

Finds, with aarch64 readelf, the shared libraries the wheel needs that neither the wheel nor the
sysroot has, the symbols the wheel imports that nothing present defines, and the symbol versions
those libraries must provide; writes OUT/stub.c (each symbol a function returning 999, a
non-success CUDA status, never called on a CPU-only run), OUT/stub.map and OUT/missing.txt (the
library names to link to the stub). Nothing here runs on a CPU-only path of torch.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def readelf(flag: str, path: Path) -> str:
    return subprocess.run(["aarch64-linux-gnu-readelf", flag, "-W", str(path)], capture_output=True,
                          text=True).stdout


def main(site: Path, sysroot: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch_objs = sorted((site / "torch" / "lib").glob("*.so*")) + sorted((site / "torch").glob("*.so"))
    lib_dirs = [site / "torch" / "lib", sysroot / "lib" / "aarch64-linux-gnu", sysroot / "usr" / "lib" / "aarch64-linux-gnu"]
    sys_objs = [sysroot / "usr" / "bin" / "python3.11"] + [p for d in lib_dirs[1:] if d.is_dir()
                                                          for p in d.iterdir() if ".so" in p.name and p.is_file()]

    def present(name: str) -> bool:
        return any((d / name).exists() for d in lib_dirs)

    missing = set()
    for obj in torch_objs + sys_objs:
        for name in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf("-d", obj)):
            if not present(name):
                missing.add(name)

    defined, imported = set(), {}
    for obj in torch_objs + sys_objs:
        for line in readelf("--dyn-syms", obj).splitlines():
            cols = line.split()
            if len(cols) < 8 or not cols[0].endswith(":"):
                continue
            bind, ndx, sym = cols[4], cols[6], cols[7]
            name, _, version = sym.partition("@")
            if ndx != "UND":
                defined.add(name)
            elif bind != "WEAK" and obj in torch_objs:
                imported[name] = version.lstrip("@")

    versions = set()  # version nodes the wheel requires from a missing library
    for obj in torch_objs:
        current = None
        for line in readelf("-V", obj).splitlines():
            file_m = re.search(r"File: (\S+)", line)
            if file_m:
                current = file_m.group(1)
                continue
            name_m = re.search(r"Name: (\S+)", line)
            if name_m and current in missing:
                versions.add(name_m.group(1))

    need = {name: ver for name, ver in imported.items() if name not in defined}
    (out / "stub.c").write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in sorted(need)))
    by_version: dict[str, list[str]] = {}
    for name, ver in need.items():
        by_version.setdefault(ver if ver in versions else "", []).append(name)
    script = []
    for ver in sorted(versions):
        syms = "".join(f" {s};" for s in sorted(by_version.get(ver, [])))
        script.append(f"{ver} {{ global:{syms} }};" if syms else f"{ver} {{ }};")
    script.append("SA_STUB { global:" + "".join(f" {s};" for s in sorted(by_version.get("", []))) + " local: *; };")
    (out / "stub.map").write_text("\n".join(script) + "\n")
    (out / "missing.txt").write_text("\n".join(sorted(missing)) + "\n")
    print(f"{len(missing)} missing libraries, {len(versions)} versions, {len(need)} stub symbols", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*(Path(a) for a in sys.argv[1:]))
