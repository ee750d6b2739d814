"""The reference projects' state_dict key lists (OpenSTL, thuml), one `name (shape)` line per entry, kept in the
repository under tests/data/keys (copies of the lists that go with the project's reference notes, MODELS.md), so
that the tests comparing vpfast's state_dicts with them run in any clone instead of skipping."""
import os
import re

KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keys")


def key_path(fname: str) -> str:
    """The path of one key list, e.g. key_path("tau_mmnist.txt")."""
    return os.path.join(KEYS, fname)


def entries(fname: str, prefix: str) -> dict:
    """{name without `prefix`: shape tuple} of the entries of key list `fname` that start with `prefix`."""
    out = {}
    with open(key_path(fname)) as f:
        for line in f:
            if line.startswith(prefix):
                name, shape = line[len(prefix):].split(" ", 1)
                out[name] = tuple(int(s) for s in shape.strip().strip("()").split(",") if s.strip())
    return out


def key_list(fname: str) -> tuple:
    """(parameter count from the header, [(name, shape tuple)] of every entry in file order) of key list `fname`:
    the whole-model lists (e.g. tau_mmnist.txt) state their parameter count in the first lines."""
    with open(key_path(fname)) as f:
        lines = f.read().splitlines()
    count = int(re.search(r"parameters: ([\d,]+)", "\n".join(lines[:3])).group(1).replace(",", ""))
    out = []
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        out.append((name, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return count, out
