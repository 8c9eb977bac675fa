"""A rank of tests/test_probing.py: the restricted top-k from vocab shards (gloo) against the full logits."""
import sys

import torch
import torch.distributed as dist

from ptuning.model.megatron_backbone import VocabShard
from ptuning.model.metrics import restricted_ranks, restricted_top

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(0)
vocab, k = 40, 10
logits = torch.randint(0, 6, (16, vocab), generator=generator).float()  # few values: ties everywhere
allowed = torch.rand(vocab, generator=generator) < 0.6
labels = allowed.nonzero().squeeze(1)[torch.randint(0, int(allowed.sum()), (16,), generator=generator)]
per = vocab // world
shard = VocabShard(rank * per, (rank + 1) * per, dist.group.WORLD)
local = logits[:, shard.start:shard.end]
top, full = restricted_top(local, allowed, k, shard), restricted_top(logits, allowed, k)
ranks = restricted_ranks(local, labels, allowed, shard)
ok = torch.equal(top, full) and torch.equal(top[:, 0] == labels, ranks == 1)
print(f"rank {rank}: {'equal' if ok else 'different'}")
sys.exit(0 if ok else 1)
