"""Run by tests/test_conformance.py under torchrun (2 processes, gloo): three plain-DDP steps (no
find_unused_parameters) of a tiny pair whose reasoner has an untied, unused LM head; rank 0 writes whether the two
replicas ended identical to the path in argv[1]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_helpers
from model_helpers import random_ids, tiny_lm  # noqa: E402

from flythinker import FlyThinkerForCausalLM  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        gen, rsn = tiny_lm(seed=0, hidden_size=48), tiny_lm(seed=1, hidden_size=32, tie_word_embeddings=False)
        model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="pad").train()
        ddp = DDP(model)  # no find_unused_parameters: every trainable parameter must get a gradient
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(3):
            ids = random_ids(2, 6, seed=100 + 10 * step + rank)
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if rank == 0:
            Path(out).write_text(json.dumps({"same": bool(torch.equal(gathered[0], gathered[1])), "steps": 3}))
        # Tear down in this order: the gloo worker thread frees the all_gather's tensors (it needs the GIL for
        # that) before the barrier completes, and the DDP reducer drops its process-group reference while the
        # group is still registered. Freeing `ddp` after destroy_process_group made the reducer's destructor join
        # the gloo thread while holding the GIL: a deadlock seen once in CI (rank 0 hung after writing its result).
        dist.barrier()
        del ddp, opt, gathered, flat
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
