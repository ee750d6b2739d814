"""The reference projects' state_dict key lists (OpenSTL, thuml), one `name (shape)` line per entry, kept in the
repository under tests/data/keys (copies of the lists that go with the project's reference notes, MODELS.md), so
that the tests comparing vpfast's state_dicts with them run in any clone instead of skipping."""
import os

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
