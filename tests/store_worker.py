"""One process of the two-process store test (tests/test_store.py): prepare the split (into the shared cache
directory), run one epoch of this process's batches, save the store's token indices it read.

    python tests/store_worker.py CONFIG_JSON PROCESS_INDEX PROCESS_COUNT OUT_NPY
"""

import json
import sys

import numpy as np

ARGS = dict(rows_per_micro_batch=2, accum_steps=2, seed=0, num_epochs=1)


def prepare(config: dict):
    from jsft.config import SFTConfig
    from jsft.data import load_tokenizer
    from jsft.data.pipeline import prepare_dataset

    sft = SFTConfig()
    sft.data.dataset_name, sft.data.cache_dir = config["rows"], config["cache"]
    sft.data.max_length, sft.data.packing, sft.data.assistant_only_loss = 256, True, True
    sft.data.skip_bad_rows = True
    tokenizer, _ = load_tokenizer(config["tokenizer"], sft.data)
    return prepare_dataset(sft, tokenizer)


if __name__ == "__main__":
    import dataclasses

    from test_store import Recording  # noqa: I001 (tests/ is this script's directory)

    from jsft.data.pipeline import batch_iterator

    config, process_index, process_count, out = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    prepared = prepare(config)
    reads = []
    ex = prepared.examples
    assert isinstance(ex.tokens, np.memmap)
    recording = dataclasses.replace(ex, tokens=Recording(ex.tokens, reads), loss_mask=Recording(ex.loss_mask, reads))
    for _ in batch_iterator(dataclasses.replace(prepared, examples=recording), process_index=process_index,
                            process_count=process_count, prefetch=0, **ARGS):
        pass
    np.save(out, np.unique(np.concatenate(reads)))
