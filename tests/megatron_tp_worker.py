"""Run under torchrun: logits and the gradient to inputs_embeds of a backbone (Megatron-11B's, or a Hugging Face
model through transformers' tensor parallelism) at tensor_parallel = world size, written by rank 0 (the test
gathers Megatron's vocab shards here, the product never does)."""
import os
import sys

import torch
import torch.distributed as dist

from launcher.distributed import init_parallel
from ptuning.model.backbone import Layout
from ptuning.config import ModelConfig
from ptuning.model.loading import load_backbone

folder, tokenizer, out = sys.argv[1:4]
ctx = init_parallel(int(os.environ["WORLD_SIZE"]))
backbone = load_backbone(ModelConfig(name=folder, tokenizer=tokenizer), ctx)
torch.manual_seed(0)
ids = torch.randint(4, 400, (3, 7))
mask = torch.ones_like(ids)
mask[1, :2] = 0  # a left-padded row
layout = Layout.padded(mask, torch.tensor([6, 6, 6]))
layout.segment[2] = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # a row shared by two facts, scored at both ends
layout.position[2] = torch.tensor([0, 1, 2, 0, 1, 2, 3])
layout.target_row, layout.target_col = torch.tensor([0, 1, 2, 2]), torch.tensor([6, 6, 2, 6])
layout.packed = True
embeds = backbone.embed(ids).detach().requires_grad_(True)
logits = backbone.scores(embeds, layout)
weights = torch.randn(4, backbone.vocab_size)
shard = backbone.vocab_shard
local = weights if shard is None else weights[:, shard.start:shard.end]
(logits * local).sum().backward()
if shard is not None:
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, logits.detach().contiguous(), group=shard.group)
    logits = torch.cat(parts, dim=1)
if ctx.rank == 0:
    torch.save({"logits": logits.detach(), "grad": embeds.grad}, out)
