"""What MESA's teacher costs in memory, with and without a LoRA adapter, measured on a causal LM of
about 125M parameters built from its config (no download), on the CPU.

For each set-up the script builds the teacher exactly as training does (`MESA.build_teacher`) and
counts the bytes of every tensor it keeps (`MESA.nbytes`), and the growth of the process's
resident memory (RSS) while it is built, next to the model's own parameter bytes:

- full fine-tuning: a float32 copy of the model (parameters and buffers);
- LoRA (PEFT): float32 EMA copies of the adapter only, on top of the shared frozen base
  (`hf_flat.methods.mesa.SwapTeacher`); while the teacher's forward pass runs, a copy of the live
  adapter values is held as well (the same size again).

    python benchmarks/mesa_teacher_memory.py            # writes benchmarks/results/mesa_teacher_memory.json
    python benchmarks/mesa_teacher_memory.py --tiny     # a 2-layer model (the test suite runs this)
"""

import argparse
import gc
import json
import os
import platform
import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_flat.methods.mesa import MESA

#: About 125M parameters: GPT-2 small's width and depth with a 32k vocabulary, Llama blocks.
SIZES = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=64),
}


def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: str, lora: bool) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **SIZES[size]))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    params = list(model.parameters())
    gc.collect()
    before = rss_mb()
    mesa = MESA()
    mesa.build_teacher(model)
    gc.collect()
    grown = rss_mb() - before
    row = {
        "model": size, "lora": lora,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "model_parameter_mb": sum(p.nbytes for p in params) / 2**20,
        "teacher_kind": type(mesa.teacher).__name__,
        "teacher_mb": mesa.nbytes / 2**20,
        "rss_growth_mb": grown,
    }
    row["teacher_share_of_model"] = row["teacher_mb"] / row["model_parameter_mb"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a quick check")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "mesa_teacher_memory.json"))
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "125m"
    rows = [measure(size, lora) for lora in (False, True)]
    for row in rows:
        print(f"{row['model']} {'LoRA r=16 all-linear' if row['lora'] else 'full model'}: "
              f"{row['parameters'] / 1e6:.1f}M parameters ({row['trainable_parameters'] / 1e6:.2f}M trainable), "
              f"model {row['model_parameter_mb']:.1f} MiB; teacher ({row['teacher_kind']}) {row['teacher_mb']:.1f} MiB "
              f"= {100 * row['teacher_share_of_model']:.1f}% of the model; RSS grew {row['rss_growth_mb']:.1f} MiB")
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "torch": torch.__version__, "rows": rows}
    if not args.tiny:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
