"""Shared pieces of the benchmark scripts: model sizes, timing, peak memory, memory bandwidth.

Real sizes are the released architectures' dimensions with random weights (nothing is downloaded): the speed of a
decode step depends on the shapes, not on the values. They are built directly on the target device in the target
dtype (never materialised in CPU RAM first), after a check on the meta device that they fit.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from policies.blip3o_next import Blip3oNextPolicy
from policies.chameleon import BOI_TOKEN, EOI_TOKEN, EOT_TOKEN, ChameleonPolicy, VQGANDecoder, _image_token_name
from policies.emu3 import EOF_TOKEN, EOL_TOKEN, Emu3Policy
from policies.janus import JanusPolicy
from policies.tiny import JANUS_CHAT_TEMPLATE, tiny_blip3o_next, tiny_chameleon, tiny_emu3, word_level_tokenizer

# ----------------------------------------------------------------------------------------------------------------
# Sizes. Text dimensions as in the released configs; a benchmark never needs the real tokenizer, so prompts go
# through the tiny word-level tokenizer (its ids are a subset of the real vocabulary).

# The language models, as released (config.json of each checkpoint).
JANUS_SIZES: dict[str, dict] = {
    # Janus-Pro-1B: DeepSeek-LLM 1.5B-class text model, SigLIP-L vision tower, VQ-16 with 16384 codes.
    "Janus-Pro-1B": dict(
        text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=102400, max_position_embeddings=16384),
        image_tokens=576, codebook=16384, gen_embed=2048, real_vision=True),
    # Janus-Pro-7B: DeepSeek-LLM-7B text model.
    "Janus-Pro-7B": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=102400, max_position_embeddings=16384),
        image_tokens=576, codebook=16384, gen_embed=4096, real_vision=True),
    # Not a release: the realistic CPU shape of the rollout issue (hidden 1024, 8 layers, ~122M parameters, the
    # real codebook and 576 tokens per image).
    "mid": dict(
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16),
        image_tokens=576, codebook=16384, gen_embed=1024, real_vision=False),
    # Not a release: the CPU comparison size (a few layers, hidden 256, the real codebook and token count).
    "cpu-bench": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
        image_tokens=576, codebook=16384, gen_embed=256, real_vision=False),
}


def janus_config(size: str, tokenizer):
    """A JanusConfig of `size` (a key of JANUS_SIZES) for the word-level tokenizer."""
    from transformers import JanusConfig

    spec = JANUS_SIZES[size]
    text = dict(model_type="llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text.update(spec["text"])
    if text["vocab_size"] < len(tokenizer):
        raise ValueError("tokenizer larger than the model vocabulary")
    hidden, patches = text["hidden_size"], int(round(spec["image_tokens"] ** 0.5))
    if spec["real_vision"]:  # SigLIP-L at 384 px, patch 16 (the JanusVisionConfig defaults), VQ-16 defaults
        vision = dict(projection_dim=hidden, num_image_tokens=spec["image_tokens"])
        vq = dict(num_embeddings=spec["codebook"], projection_dim=spec["gen_embed"],
                  image_token_embed_dim=spec["gen_embed"])
    else:
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=patches * 4,
                      patch_size=4, num_image_tokens=patches * patches, projection_dim=hidden, mlp_ratio=2, depth=1)
        vq = dict(embed_dim=8, num_embeddings=spec["codebook"], latent_channels=32, base_channels=32,
                  channel_multiplier=[1, 1, 1], num_res_blocks=1, projection_dim=spec["gen_embed"],
                  image_token_embed_dim=spec["gen_embed"], num_hidden_layers=2)
    # The releases keep the text lm_head apart from the input embeddings (7.42B parameters for Janus-Pro-7B, 2.09B
    # for -1B); it is never read while drawing, but it takes memory.
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
                       tie_word_embeddings=not spec["real_vision"])


def build_janus_size(size: str, device: str, dtype: torch.dtype, compile_decode: bool = False):
    """A JanusPolicy of a named size with random weights, built on `device` in `dtype`; refuses if it cannot fit."""
    from transformers import JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor


    if size not in JANUS_SIZES:
        raise SystemExit(f"unknown size {size!r} for janus; known: {', '.join(JANUS_SIZES)}")
    specials = ["<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<|User|>:", "<|Assistant|>:"]
    tokenizer = word_level_tokenizer(specials, extra_special={
        "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_placeholder>"})
    config = janus_config(size, tokenizer)
    with torch.device("meta"):
        meta = JanusForConditionalGeneration(config)
    need = sum(p.numel() for p in meta.parameters()) * torch.finfo(dtype).bits // 8
    del meta
    check_fits(need, device, f"janus {size} in {dtype}")
    with _default_dtype(dtype), torch.device(device):
        model = JanusForConditionalGeneration(config)
    model.requires_grad_(False)
    model.eval()
    side = config.vision_config.image_size
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tokenizer, chat_template=JANUS_CHAT_TEMPLATE,
                               num_image_tokens=config.vision_config.num_image_tokens)
    return JanusPolicy(model, processor)


# The other families at the mid shape (not releases): the mid text dimensions and each family's real image length
# and codebook. Their image decoders stay tiny: a rollout benchmark never decodes.
MID_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16)
FAMILY_MID = {
    # BLIP3o-NEXT: Qwen3 (grouped-query attention, 8 KV heads here), 729 tokens (27x27) from TA-Tok's 65536 codes
    "blip3o_next": dict(tokens=729, codebook=65536),
    # Chameleon/Anole: 1024 tokens (32x32) from the release VQGAN's 8192 codes
    "chameleon": dict(resolution=128, codebook=8192),
    # Emu3: a 32x32 grid (32 rows of 32 codes + EOL, then EOF/EOI/EOS: 1060 tokens), the release's 32768 codes
    "emu3": dict(resolution=256, codebook=32768),
}


def _built(make: Callable[[], nn.Module], device: str, dtype: torch.dtype, what: str) -> nn.Module:
    """`make()` on `device` in `dtype`, refused first (on the meta device) if it would not fit."""
    with torch.device("meta"):
        need = sum(p.numel() for p in make().parameters()) * torch.finfo(dtype).bits // 8
    check_fits(need, device, f"{what} in {dtype}")
    with _default_dtype(dtype), torch.device(device):
        model = make()
    return model.requires_grad_(False).eval()


def build_blip3o_next_size(size: str, device: str, dtype: torch.dtype):
    """BLIP3o-NEXT at the mid shape: the tiny tokenizer and decoder, a mid Qwen3 whose vocabulary holds the real
    codebook after the tokenizer's `<I0>` (ids past the tokenizer are never decoded as text while drawing)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if size != "mid":
        raise SystemExit(f"unknown size {size!r} for blip3o_next; known: mid")
    spec = FAMILY_MID["blip3o_next"]
    small, tokenizer, decoder, ids, _ = tiny_blip3o_next()
    config = Qwen3Config(**{**MID_TEXT, "num_key_value_heads": 8}, head_dim=64, max_position_embeddings=4096,
                         vocab_size=ids["image_start_token_id"] + spec["codebook"], tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = _built(lambda: Qwen3ForCausalLM(config), device, dtype, "blip3o_next mid")
    return Blip3oNextPolicy(model, tokenizer, decoder.to(device), ids=ids, tokens_per_image=spec["tokens"],
                            codebook_size=spec["codebook"])


def build_chameleon_size(size: str, device: str, dtype: torch.dtype):
    """Chameleon/Anole at the mid shape: mid text dimensions, the release's 8192 IMGIMG tokens and a 32x32 grid
    (its VQGAN decoder stays tiny in width)."""
    from transformers import ChameleonForConditionalGeneration

    if size != "mid":
        raise SystemExit(f"unknown size {size!r} for chameleon; known: mid")
    spec = FAMILY_MID["chameleon"]
    with torch.device("meta"):  # only the config and tokenizer are kept from this one
        small, tokenizer = tiny_chameleon(
            [BOI_TOKEN, EOI_TOKEN, EOT_TOKEN, "<image>"], [_image_token_name(k) for k in range(spec["codebook"])],
            extra_special={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": "<image>"},
            text={**MID_TEXT, "max_position_embeddings": 4096}, resolution=spec["resolution"])
    model = _built(lambda: ChameleonForConditionalGeneration(small.config), device, dtype, "chameleon mid")
    with torch.device(device):
        decoder = VQGANDecoder(model.config.vq_config)
    return ChameleonPolicy(model, tokenizer, decoder)


def build_emu3_size(size: str, device: str, dtype: torch.dtype):
    """Emu3 at the mid shape: the tiny architecture with mid text dimensions and the release's codebook."""
    from transformers import Emu3ForConditionalGeneration

    if size != "mid":
        raise SystemExit(f"unknown size {size!r} for emu3; known: mid")
    spec = FAMILY_MID["emu3"]
    with torch.device("meta"):  # only the config and processor are kept from this one
        small, processor = tiny_emu3(EOL_TOKEN, EOF_TOKEN, codes=spec["codebook"],
                                     text={**MID_TEXT, "max_position_embeddings": 4096})
    model = _built(lambda: Emu3ForConditionalGeneration(small.config), device, dtype, "emu3 mid")
    return Emu3Policy(model, processor, resolution=spec["resolution"])


def free_memory(device: str | torch.device) -> tuple[int, str]:
    """(bytes free on `device`, what the device is called in a message)."""
    if torch.device(device).type == "cuda":
        return (torch.cuda.mem_get_info(torch.device(device))[0],
                f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    return _available_ram(), "this machine's RAM"


def check_fits(weight_bytes: int, device: str, what: str, headroom: float = 1.3) -> None:
    """Exit with a clear message when the weights (times a working headroom) exceed the device's free memory."""
    free, where = free_memory(device)
    if weight_bytes * headroom > free:
        raise SystemExit(f"refusing to build {what}: its weights take {weight_bytes / 2**30:.1f} GiB (plus working "
                         f"memory), {where} has {free / 2**30:.1f} GiB free. Use a smaller --size or a larger device.")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class PeakMemory:
    """Peak memory of a block, above what was in use when it started: allocator peak on CUDA, sampled resident set
    size on CPU (every 20 ms; short-lived spikes can be missed, and freed pages the allocator keeps count). Polling
    every 2 ms slowed the block it measured on the 2-core machine (mid Janus, fp32: 116 against 100 CPU-s, and
    noisier steps: the poller preempts an OpenMP thread, which stalls the other at its barrier)."""

    device: torch.device
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    poll_seconds = 0.02  # a class attribute, not a field

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._max = _rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, _rss()) - self._start


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA. On CPU, this process's CPU time: the benchmark machines are shared, and other processes'
    load inflates wall time but not the CPU time a single-threaded run uses (run with OMP_NUM_THREADS=1)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


class Timing(NamedTuple):
    seconds: float  # median over the timed rounds
    result: object  # of the last run
    peak_bytes: int  # of the warm-up run
    step_ms: tuple[float, float] | None  # (start, end) of the image, from the warm-up run; None: not stamped
    wall_seconds: float  # median wall time over the same rounds (equal to `seconds` on CUDA)


class StepStamps:
    """Stamps every forward of `module` (a decode step runs the first decoder layer once per forward) so that the
    cost of a step at the start and at the end of an image can be read off one run. On CUDA each stamp
    synchronises, so only an untimed run should be stamped."""

    def __init__(self, module: nn.Module | None, device: torch.device) -> None:
        self.module, self.device, self.stamps = module, device, []

    def __enter__(self) -> "StepStamps":
        def stamp(*_):
            sync(self.device)
            self.stamps.append(time.perf_counter())

        self.handle = self.module.register_forward_hook(stamp) if self.module is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def step_ms(self, tokens: int, window: int = 8) -> tuple[float, float] | None:
        """Median ms per token over the first and last `window` tokens (forwards per token are counted from the
        stamps: `generate` with unbatched CFG runs two); None when too few forwards were seen."""
        per_token = round(len(self.stamps) / tokens) if tokens else 0
        if per_token < 1 or len(self.stamps) < per_token * (2 * window + 2):
            return None
        starts = self.stamps[::per_token]
        gaps = [1000 * (b - a) for a, b in zip(starts, starts[1:])]
        return statistics.median(gaps[1 : window + 1]), statistics.median(gaps[-window:])


def timed_interleaved(methods: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      warmup: int = 1, step_module: nn.Module | None = None, tokens: int = 0,
                      unstamped: tuple[str, ...] = (), interleave: bool = True,
                      release: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Median seconds of each method over `repeats` rounds, the methods taking turns within a round so that load
    changes hit them alike. The warm-up run also gives the peak memory and, with `step_module` and `tokens` (per
    image), ms per step at the start and end of the image (methods in `unstamped`, e.g. CUDA-graph replays that
    a hook would break, are not stamped).

    With `interleave` False each method runs its warm-up and all its rounds before the next one starts, and then
    `release(name)` frees what it keeps: on a GPU, where nothing else loads the device but memory is short, so that
    one method's kept buffers (the static cache of CUDA graphs) never sit beside the next method's KV cache."""
    now = clock(device)
    peaks, results, steps = {}, {}, {}
    times, walls = {name: [] for name in methods}, {name: [] for name in methods}
    for turn in [list(methods)] if interleave else [[name] for name in methods]:
        for name in turn:
            stamped = step_module if name not in unstamped else None
            with PeakMemory(device) as memory, StepStamps(stamped, device) as stamps:
                for _ in range(warmup):
                    stamps.stamps.clear()
                    results[name] = methods[name]()
            peaks[name], steps[name] = memory.peak_bytes, stamps.step_ms(tokens) if stamped is not None else None
        for _ in range(repeats):
            for name in turn:
                sync(device)
                start, wall = now(), time.perf_counter()
                results[name] = methods[name]()
                sync(device)
                times[name].append(now() - start)
                walls[name].append(time.perf_counter() - wall)
        for name in turn if release is not None else ():
            release(name)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {name: Timing(median(times[name]), results[name], peaks[name], steps[name], median(walls[name]))
            for name in methods}


def measure_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (counts the read and the write)."""
    megabytes = megabytes or (1024 if device.type == "cuda" else 128)
    # filled, not empty: on CPU the pages of an untouched tensor all map the kernel's one zero page, which sits in
    # cache, so a copy from it read 1.4x faster than from real memory (13-15 against 9-11 GB/s, 2-core AMD EPYC)
    src = torch.ones(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def cudagraph_skips(compile_mode: str | None) -> str:
    """How many compiled graphs inductor has run without their CUDA graph in this process; "n/a" where the decode
    step's `compile_mode` (`decode_compile_mode`) captures none (on CPU, or not "reduce-overhead"). A skip is no
    error, only a warning on stderr with its reason (an input the graph mutates at an address that is not static,
    a CPU tensor among its inputs, ...); the step then launches its kernels one by one, slower and otherwise silent.
    """
    if compile_mode != "reduce-overhead":
        return "n/a"
    from torch._dynamo.utils import counters

    return str(counters["inductor"]["cudagraph_skips"])


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch thread(s) (torch {torch.__version__})"


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
