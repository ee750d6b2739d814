"""The facts the tests compare with live in the repository: every reference key list under tests/data/keys is
complete (its header's entry count), and no test reads a file outside the repository (a clone has none)."""
import os
import re

import pytest

from reference_keys import KEYS, key_path

HERE = os.path.dirname(os.path.abspath(__file__))
# the reference models of shared/reference/MODELS.md, including those vpfast does not build yet
LISTS = ("convlstm_mmnist", "e3dlstm_mmnist", "mim_mmnist", "motionrnn_64x4", "phydnet_mmnist",
         "predrnn_layernorm_mmnist", "predrnn_mmnist", "predrnnpp_mmnist", "predrnnv2_mmnist",
         "simvp_gsta_mmnist", "simvp_incepu_mmnist", "tau_mmnist")


def test_every_key_list_is_in_the_repository():
    assert sorted(f[:-4] for f in os.listdir(KEYS) if f.endswith(".txt")) == sorted(LISTS)


@pytest.mark.parametrize("name", LISTS)
def test_key_list_is_complete(name):
    with open(key_path(f"{name}.txt")) as f:
        lines = f.read().splitlines()
    count = int(re.search(r"state_dict entries: (\d+)", "\n".join(lines[:3])).group(1))
    rows = [line for line in lines if line.strip() and not line.startswith("#")]
    assert len(rows) == count
    assert all(re.fullmatch(r"\S+ \((\d+(, ?\d+)*,?)?\)", r) for r in rows), [r for r in rows if " (" not in r]


def test_no_test_reads_a_file_outside_the_repository():
    # the spellings the key-list readers used before tests/data existed: ../../shared/reference/keys, /work/...
    outside = re.compile(r"""["']\.\.["'],\s*["']\.\.["']|parents\[2\]|["']/work/|shared/reference""")
    found = []
    for fname in sorted(os.listdir(HERE)):
        if fname.endswith(".py") and fname != os.path.basename(__file__):
            with open(os.path.join(HERE, fname)) as f:
                found += [f"{fname}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                          if outside.search(line) and not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)
