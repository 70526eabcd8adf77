"""Hostile files: a folder an attacker (or an unlucky user) could hand to csgguard.

Every bug the hostile-input probe found left a file here; add one for each new bug.
:func:`make_hostile_tree` builds the folder, :class:`HostileTree` says what is in it
and what must become of each entry. ``conftest.py`` exposes it as the ``hostile_tree``
fixture (built from one real digits PNG so the readable entries are scored).

Names covered: rich markup (``[b]a.png`` prints as ``a.png`` if read as markup; the
folder is named ``[`` so ``[/x].png`` crashes a markup parser), ESC sequences, newline, tab, a byte that is not
UTF-8 next to a file whose name literally spells its escape, spreadsheet formulas
(``=``, ``+``, ``-``, ``@``), a symlink loop, links leaving the folder (one to a real
image, one to /etc/passwd), a link inside the folder, a broken link, an unreadable
sub-folder and an ordinary sub-folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# name (bytes, as on disk) -> what screen must do with it
READABLE = [
    b"[b]a.png",          # markup: must not print as "a.png"
    b"x].png",            # inside the folder named "[": the path holds "[/x].png", a closing tag
    b"a\x1b[0m.png",      # ESC: must print escaped, never raw, never stripped
    b"new\nline.png",     # newline: one row, one line
    b"tab\tname.png",
    b"x\xff.png",         # not UTF-8 ...
    b"x\\xff.png",        # ... and a name that literally spells its escape: must print differently
    b"=HYPERLINK(1).png",  # CSV formula injection
    b"+1.png",
    b"-2.png",
    b"@SUM(1).png",
    b"inside-link.png",   # a symlink to a file inside the folder: followed
]
FORMULA = [b"=HYPERLINK(1).png", b"+1.png", b"-2.png", b"@SUM(1).png"]
ERRORS = {
    b"loop.png": "symlink loop",           # loop.png -> loop.png
    b"outside.png": "leads outside",       # -> an image outside the folder
    b"passwd.png": "leads outside",        # -> /etc/passwd
    b"broken.png": "broken symlink",       # -> a file that does not exist
}
LOCKED = b"locked"     # a sub-folder that cannot be listed (holds an image)
SUB = b"sub"           # an ordinary sub-folder (holds an image)


@dataclass
class HostileTree:
    root: Path
    outside: Path                      # an image outside root that a link points to
    readable: list[bytes] = field(default_factory=lambda: list(READABLE))
    errors: dict[bytes, str] = field(default_factory=lambda: dict(ERRORS))

    def path(self, name: bytes) -> bytes:
        return os.fsencode(self.root) + b"/" + name

    @property
    def locked(self) -> Path:
        return Path(os.fsdecode(self.path(LOCKED)))

    def deny_locked(self, monkeypatch) -> None:
        """Make ``locked/`` unreadable; as root (chmod cannot stop root) fake it at os.scandir."""
        os.chmod(self.locked, 0)
        if os.geteuid() != 0:
            return
        real = os.scandir
        locked = os.fspath(self.locked)

        def scandir(path="."):
            if os.fsdecode(os.fspath(path)).rstrip("/") == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real(path)
        monkeypatch.setattr(os, "scandir", scandir)

    def restore(self) -> None:
        os.chmod(self.locked, 0o755)


def make_hostile_tree(base: Path, image: bytes) -> HostileTree:
    """Build the hostile folder under ``base`` from one valid image file's bytes."""
    root = base / "["  # so every path holds "[/": with x].png, rich reads "[/x]" as a closing tag
    root.mkdir()
    outside_dir = base / "elsewhere"
    outside_dir.mkdir()
    outside = outside_dir / "secret.png"
    outside.write_bytes(image)
    rb = os.fsencode(root)
    for name in READABLE:
        if name == b"inside-link.png":
            continue
        with open(rb + b"/" + name, "wb") as f:
            f.write(image)
    os.symlink(b"[b]a.png", rb + b"/inside-link.png")
    os.symlink(b"loop.png", rb + b"/loop.png")
    os.symlink(os.fsencode(outside), rb + b"/outside.png")
    os.symlink(b"/etc/passwd", rb + b"/passwd.png")
    os.symlink(b"gone.png", rb + b"/broken.png")
    for sub in (LOCKED, SUB):
        os.mkdir(rb + b"/" + sub)
        with open(rb + b"/" + sub + b"/img.png", "wb") as f:
            f.write(image)
    return HostileTree(root, outside)
