"""Which image files a set of paths names: the one folder walker, under one symlink policy.

Hostile folders are met here, for screening and for training alike:

* a file named on the command line is read as named (links included: you chose it);
* inside a folder, a symlink is followed only when it stays inside the boundary (by
  default the folder given; training passes the dataset root, so a class folder may
  link into a sibling). A link that leaves it (``x.png -> /etc/passwd``), a symlink
  loop and a broken link each become an entry with an error and are not read;
  ``follow_symlinks`` reads links that leave (symlinked sub-folders are then descended
  when ``recursive``, each real folder once);
* a sub-folder that cannot be listed becomes an error entry; without ``recursive``
  sub-folders are skipped and counted;
* entries hold the raw path (``os.fsdecode`` text: open() takes it back), sorted by
  raw bytes, each once.

Callers decide what an error entry means: ``csgguard screen`` prints an error row and
goes on; training refuses the dataset, since a model must not learn from files it
was never meant to see.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import CsgguardError
from .images import IMAGE_SUFFIXES

FOLLOW_HINT = "(--follow-symlinks reads it)"


@dataclass
class Listing:
    """What :func:`list_inputs` found: ``(path, error)`` entries sorted by raw bytes, and what it skipped."""

    entries: list[tuple[str, str | None]] = field(default_factory=list)
    skipped_subfolders: int = 0

    @property
    def files(self) -> list[str]:
        return [p for p, e in self.entries if e is None]

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(p, e) for p, e in self.entries if e is not None]


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES or exc.errno == errno.EPERM:
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return exc.strerror or exc.__class__.__name__


def list_inputs(paths: Iterable[str | os.PathLike], *, recursive: bool = False, follow_symlinks: bool = False,
                within: str | os.PathLike | None = None, follow_hint: bool = True) -> Listing:
    """List the image files named by ``paths`` under the symlink policy of this module's docstring.

    ``within`` is the folder links may not leave (default: each folder in ``paths``);
    ``follow_hint`` adds the ``--follow-symlinks`` hint to an outside link's error, for
    callers that offer that option. A path that does not exist at all is a usage error
    (:class:`CsgguardError`); everything found inside folders becomes an entry, with an
    error when it must not or cannot be read.
    """
    listing = Listing()
    seen: dict[str, str | None] = {}
    hint = f" {FOLLOW_HINT}" if follow_hint else ""

    def add(path: str, error: str | None = None) -> None:
        if path not in seen or (seen[path] is not None and error is None):
            seen[path] = error

    for given in paths:
        p = os.fspath(given)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not os.path.lexists(p):
            raise CsgguardError(f"{p}: no such file or folder")
        if not os.path.isdir(p):
            add(p)
            continue
        boundary = p if within is None else os.fsdecode(os.fspath(within))
        root = os.path.realpath(boundary)
        visited = {os.path.realpath(p)}
        stack = [p]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    found = list(it)
            except OSError as exc:
                add(folder, f"cannot list folder ({_reason(exc)})")
                continue
            for e in found:
                full = e.path
                image = _is_image_name(e.name)
                try:
                    link = e.is_symlink()
                    if not link:
                        if e.is_dir(follow_symlinks=False):
                            if recursive:
                                stack.append(full)
                            else:
                                listing.skipped_subfolders += 1
                        elif image:
                            add(full)
                        continue
                except OSError as exc:
                    if image or recursive:
                        add(full, f"cannot read ({_reason(exc)})")
                    continue
                try:
                    target = os.path.realpath(full, strict=True)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        add(full, "symlink loop; not read")
                    elif image:
                        add(full, "broken symlink")
                    continue
                is_dir = os.path.isdir(target)
                outside = not _inside(target, root)
                if is_dir:
                    if not recursive:
                        listing.skipped_subfolders += 1
                    elif outside and not follow_symlinks:
                        add(full, f"symlinked folder leads outside {boundary} (-> {target}); not followed"
                                  + (" (--follow-symlinks descends it)" if follow_hint else ""))
                    elif follow_symlinks and target not in visited:
                        visited.add(target)
                        stack.append(full)
                    # a symlinked folder inside the boundary: its files are listed under their real path
                elif image:
                    if outside and not follow_symlinks:
                        add(full, f"symlink leads outside {boundary} (-> {target}); not read{hint}")
                    else:
                        add(full)
    listing.entries = sorted(seen.items(), key=lambda kv: os.fsencode(kv[0]))
    return listing


__all__ = ["Listing", "list_inputs"]
