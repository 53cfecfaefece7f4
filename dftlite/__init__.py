"""dftlite: Discriminative Fine-Tuning (DFT/DFT2; Guo et al. 2025, arXiv 2502.18679) with QLoRA.

Not TRL's `loss_type="dft"`, which is Dynamic Fine-Tuning, an unrelated method; "DFT" in this package
always means the discriminative one.
"""

import logging
import warnings

__version__ = "0.1.0"

# Library noise that dftlite causes and its user cannot act on, silenced by exact message, once, before
# torch, transformers, peft or bitsandbytes are imported. Every other warning is left alone.
# - transformers 5 renamed gradient checkpointing to activation checkpointing; peft and the Trainer still
#   call the old names, and `gradient_checkpointing` is dftlite's documented field.
# - torch's DataLoader warns about pin_memory on a CPU-only machine; dftlite's batches are a few indices.
# - bitsandbytes imports torch.jit.script_method (deprecated) at import time.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"'pin_memory' argument is set as true but no accelerator is found",
                        category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


# bitsandbytes (0.50), when imported on a CPU with AVX512-BF16, asks the `kernels` package for a fused
# 4-bit kernel from the Hub (kernels-community/quantization-bitsandbytes). No setting of bitsandbytes,
# kernels (0.19) or transformers (5.x) turns that lookup off: bitsandbytes/backends/cpu/ops.py runs it
# at import whenever the CPU has the instructions and `kernels` imports, and transformers 5 depends on
# `kernels`. Offline it fails, and both packages log about it ("Skipping publisher trust check ...",
# "Failed to load CPU gemm_4bit_forward ..."), wording that changes between releases. dftlite never
# uses that kernel (models._keep_4bit_trainable_on_cpu switches it off: it has no backward), so the
# two loggers, the whole `kernels` package and bitsandbytes' CPU backend, show errors only.
# `dftlite --verbose` shows their warnings again.
HUB_KERNEL_LOGGERS = ("kernels", "bitsandbytes.backends.cpu.ops")


def quiet_hub_kernel_lookup(quiet: bool = True) -> None:
    for name in HUB_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)


quiet_hub_kernel_lookup()
