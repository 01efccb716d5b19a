"""Several processes as a user launches them: `torchrun --nproc_per_node 2 -m lmkd distill cfg.yaml`
on CPUs runs real DDP (the student of a 1-process run with the same global batch), `accelerate
launch --num_processes 2 --cpu` -- which starts one process -- refuses in one line; and the rules
of lmkd.train.processes on their own."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _mp_helpers import assert_same_student
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lmkd import make_student
from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_model
from lmkd.train import processes

ROOT = Path(__file__).resolve().parents[1]
REFUSAL = "accelerate launch started 1 process, not the --num_processes you asked for"


class Config:
    """What settle_processes / check_process_group read of a DistillationConfig."""

    def __init__(self, use_cpu=False, deepspeed=None, world_size=1):
        self.use_cpu, self.deepspeed, self.world_size = use_cpu, deepspeed, world_size


TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
# what accelerate's simple launcher (accelerate launch --cpu --num_processes 2) hands its one process
ACCELERATE_CPU_ENV = {
    "ACCELERATE_USE_CPU": "True",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_MIXED_PRECISION": "no",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def test_torchrun_on_a_cpu_machine_sets_use_cpu():
    config = Config()
    processes.settle_processes(config, env=TORCHRUN_ENV, accelerator=False)
    assert config.use_cpu is True


@pytest.mark.parametrize(
    "env, accelerator, deepspeed",
    [
        (TORCHRUN_ENV, True, None),  # GPUs: the Trainer joins them itself (NCCL)
        ({}, False, None),  # one process: the Trainer's own choice
        (dict(TORCHRUN_ENV, WORLD_SIZE="1"), False, None),
        (TORCHRUN_ENV, False, {"zero_optimization": {"stage": 2}}),  # DeepSpeed picks its own
    ],
)
def test_use_cpu_left_alone(env, accelerator, deepspeed):
    config = Config(deepspeed=deepspeed)
    processes.settle_processes(config, env=env, accelerator=accelerator)
    assert config.use_cpu is False


@pytest.mark.parametrize("extra", [{}, {"ACCELERATE_USE_CPU": "False"}])
def test_accelerate_starting_one_of_several_is_refused(extra):
    with pytest.raises(LmkdError, match="torchrun --nproc_per_node N -m lmkd distill"):
        processes.settle_processes(
            Config(), env=dict(ACCELERATE_CPU_ENV, **extra), accelerator=False
        )


@pytest.mark.parametrize(
    "env",
    [
        {k: v for k, v in ACCELERATE_CPU_ENV.items() if not k.startswith("MASTER")},  # 1 process
        dict(ACCELERATE_CPU_ENV, WORLD_SIZE="2", LOCAL_RANK="0"),  # accelerate ran torchrun
        dict(ACCELERATE_CPU_ENV, PMI_SIZE="2"),  # accelerate ran mpirun
        {"MASTER_ADDR": "10.0.0.1"},  # no accelerate launch
    ],
)
def test_accelerate_launches_that_start_what_they_say_pass(env):
    assert not processes.accelerate_started_one(env)
    processes.settle_processes(Config(use_cpu=True), env=env, accelerator=False)


def test_launched_processes_reads_the_launchers_variables():
    assert processes.launched_processes({}) == 1
    assert processes.launched_processes({"WORLD_SIZE": "4"}) == 4
    assert processes.launched_processes({"OMPI_COMM_WORLD_SIZE": "3"}) == 3


def test_processes_without_a_group_are_refused():
    with pytest.raises(LmkdError, match="2 processes were launched but the Trainer set up no"):
        processes.check_process_group(Config(world_size=1), env=TORCHRUN_ENV)
    processes.check_process_group(Config(world_size=2), env=TORCHRUN_ENV)
    processes.check_process_group(Config(world_size=1), env={})


def test_the_config_refuses_an_accelerate_launch_of_one(monkeypatch, tmp_path):
    """Through DistillationConfig itself (what `lmkd distill` and Python users build)."""
    from lmkd import DistillationConfig

    for k, v in ACCELERATE_CPU_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LmkdError, match=REFUSAL):
        DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none")


# ---- the commands a user types (slow: 2 CPU processes) -----------------------------------------


@pytest.fixture()
def recipe(tiny_model_dir, tmp_path, corpus):
    """(write a recipe YAML with a per-process batch and output dir -> its path, student's start)."""
    teacher_dir = tiny_model_dir("bart", layers=2, dropout=0.0)
    student = make_student(load_model(teacher_dir), encoder_layers=[0], decoder_layers=[1])
    student.save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus[:48]))

    def write(name: str, batch: int) -> str:
        keys = dict(  # no use_cpu, no ddp_backend: what a recipe for GPUs holds
            student_model_name_or_path=str(tmp_path / "student"),
            teacher_model_name_or_path=teacher_dir,
            task="translation",
            train_file=str(data),
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=batch,
            max_steps=3,
            learning_rate=1e-3,
            kd_alpha=0.5,
            report_to="none",
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(keys))
        return str(path)

    return write, student.state_dict()


def launch(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(recipe, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmkd distill cfg.yaml`, no CPU flags: one DDP run (before,
    two independent runs into one directory), the student of one process with the same global
    batch."""
    write, start = recipe
    one = launch("-m", "lmkd", "distill", write("one", 8))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29551",
        "-m",
        "lmkd",
        "distill",
        write("two", 4),
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stderr.count("student saved to") == 1  # process 0 alone reports
    assert json.loads(two.stdout)["epoch"] == json.loads(one.stdout)["epoch"]
    assert_same_student(AutoModelForSeq2SeqLM, tmp_path / "one", tmp_path / "two", start)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--use_cpu", "true", "--ddp_backend", "gloo"]])
def test_accelerate_cpu_two_processes_refuses_in_one_line(recipe, tmp_path, flags):
    """`accelerate launch --num_processes 2 --cpu` starts one process (accelerate's simple
    launcher): lmkd refuses in one line, before it trains or writes anything."""
    write, _ = recipe
    done = launch(
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "-m",
        "lmkd",
        "distill",
        write("acc", 4),
        *flags,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("lmkd distill: error:")]
    assert len(lines) == 1 and REFUSAL in lines[0], done.stderr[-2000:]
    assert "torchrun --nproc_per_node N -m lmkd distill cfg.yaml" in lines[0]
    assert not (tmp_path / "acc").exists()


# ---- FSDP: what is checked when the trainer is built -------------------------------------------


class Accelerator:
    """What check_sharding / load_frozen_teacher read of accelerate's Accelerator."""

    def __init__(self, fsdp2=False, plugin=None):
        self.is_fsdp2 = fsdp2
        self.state = SimpleNamespace(fsdp_plugin=plugin)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_fsdp2_refuses_an_embedding_shared_beyond_its_two_ends(tiny_model_dir, arch):
    model = load_model(tiny_model_dir(arch, layers=2))
    embed = model.get_input_embeddings().weight
    others = {  # the modules besides the input/output embeddings that hold the embedding weight
        n
        for n, m in model.named_modules()
        if getattr(m, "weight", None) is embed
        and m is not model.get_input_embeddings()
        and m is not model.get_output_embeddings()
    }
    assert {n.split(".")[-2] for n in others} == {"encoder", "decoder"}
    fsdp2 = Accelerator(fsdp2=True, plugin=SimpleNamespace())
    with pytest.raises(LmkdError, match="FSDP2 cannot shard this") as e:
        processes.check_sharding(SimpleNamespace(fsdp=True), fsdp2, model)
    assert all(n in str(e.value) for n in others)
    # FSDP1 (and no FSDP) wraps the whole model in one unit: nothing to refuse
    processes.check_sharding(SimpleNamespace(fsdp=True), Accelerator(plugin=object()), model)


def test_fsdp2_takes_a_causal_lm(tiny_model_dir):
    model = load_model(tiny_model_dir("gpt2", layers=2))
    fsdp2 = Accelerator(fsdp2=True, plugin=SimpleNamespace())
    processes.check_sharding(SimpleNamespace(fsdp=True), fsdp2, model)


def test_fsdp_without_fsdp_says_so(tiny_model_dir, caplog):
    model = load_model(tiny_model_dir("gpt2", layers=2))
    with caplog.at_level("WARNING", logger="lmkd.train.processes"):
        processes.check_sharding(SimpleNamespace(fsdp=True), Accelerator(), model)
    assert "fsdp is set but accelerate did not enable FSDP" in caplog.text


def test_cpu_ram_efficient_loading_refused_for_a_teacher_path(tiny_model_dir, tokenizer):
    from lmkd.teacher.frozen import load_frozen_teacher

    path = tiny_model_dir("gpt2", layers=2)
    lazy = Accelerator(fsdp2=True, plugin=SimpleNamespace(cpu_ram_efficient_loading=True))
    with pytest.raises(LmkdError, match="cpu_ram_efficient_loading"):
        load_frozen_teacher(
            path,
            kind="causal",
            student=load_model(path),
            student_tokenizer=tokenizer,
            accelerator=lazy,
        )
