"""Expert parallelism over 2 gloo processes equals one process for the masked-LM and translation tasks:
weights after a run through all three phases, validation loss, masked accuracy, and BLEU / chrF of the
decoded sentences (every rank decodes in step: each decoding step is a collective)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_harness import run_ranks
from seq_workers import TASKS, seq_tasks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep2seq")
    run_ranks(seq_tasks, 2, str(root))
    return root


@pytest.mark.parametrize("preset", list(TASKS))
def test_ep2_equals_one_process(launched, preset):
    fails = sorted(launched.glob(f"{preset}.rank*.fail"))
    if fails:
        pytest.fail("\n".join(f"{f.name}:\n{f.read_text()}" for f in fails), pytrace=False)
    assert len(list(launched.glob(f"{preset}.rank*.done"))) == 2
