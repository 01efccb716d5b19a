"""Run by tests/test_multiprocess.py under torchrun (2 CPU processes, gloo): lmkd's FSDP2 teacher
sharding (lmkd.teacher.fsdp_teacher.shard_teacher) on an encoder-decoder whose embedding is tied
across encoder, decoder and head -- each process holds half of every sharded weight, and the
sharded teacher's logits equal the whole teacher's.  argv: teacher_dir"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lmkd.models.loading import load_model
from lmkd.teacher.fsdp_teacher import shard_teacher

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def main():
    teacher = load_model(sys.argv[1], kind="seq2seq").eval().requires_grad_(False)
    whole = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(rank)  # each process its own batch, as in training
    ids = torch.randint(5, teacher.config.vocab_size, (3, 7))
    decoder_ids = torch.randint(5, teacher.config.vocab_size, (3, 5))
    with torch.no_grad():
        expected = teacher(input_ids=ids, decoder_input_ids=decoder_ids).logits
    shard_teacher(teacher, init_device_mesh("cpu", (world,)))
    layers = [m for m in teacher.modules() if isinstance(m, FSDPModule) and m is not teacher]
    assert isinstance(teacher, FSDPModule) and len(layers) == 4, len(layers)  # 2 + 2 layers
    assert all(isinstance(p, DTensor) and not p.requires_grad for p in teacher.parameters())
    big = teacher.get_input_embeddings().weight
    assert big.to_local().shape[0] <= -(-big.shape[0] // world) < big.shape[0], "not sharded"
    assert teacher.lm_head.weight is big  # the tie survives sharding
    for _ in range(2):  # twice: the weights are gathered again after being freed
        with torch.no_grad():
            got = teacher(input_ids=ids, decoder_input_ids=decoder_ids).logits
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v)
        for k, v in teacher.state_dict().items()
    }
    assert all(torch.equal(full[k], v) for k, v in whole.items())
    print(f"rank {rank}/{world}: sharded teacher ok")


try:
    main()
finally:  # gloo can hang at exit without it, above all after an error
    dist.destroy_process_group()
