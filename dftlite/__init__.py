"""dftlite: Discriminative Fine-Tuning (DFT/DFT2; Guo et al. 2025, arXiv 2502.18679) with QLoRA."""

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


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def not_the_cpu_kernel_download(record: logging.LogRecord) -> bool:
    # bitsandbytes on AVX512-BF16 CPUs tries to fetch a kernel from the Hub and logs its failure; dftlite
    # switches that kernel off anyway (models._keep_4bit_trainable_on_cpu), so the line only misleads.
    # `dftlite --verbose` shows it again.
    return "gemm_4bit_forward" not in record.getMessage()


logging.getLogger(BNB_CPU_LOGGER).addFilter(not_the_cpu_kernel_download)
