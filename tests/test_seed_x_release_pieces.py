"""SEED-X pieces that the release needs and does not ship as we load them: the negative-branch features built from
the Qwen-VL vision tower, and its slow sentencepiece LLaMA tokenizer."""

import io
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import policies
from conftest import PROMPTS
from policies.checkpoints.seed_x_negative import build_negative_embeds, main
from policies.modules.qwen_vit import QwenViT, QwenViTConfig
from policies.seed_x import NEGATIVE_FILE, NUM_IMAGE_TOKENS, TOKENIZER_DIR, image_token

TINY_VIT = QwenViTConfig(image_size=448, patch_size=14, width=24, layers=2, heads=4, mlp_width=48, num_queries=256,
                         output_dim=32, pool_heads=4)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return QwenViT(TINY_VIT).eval()


def test_vision_tower_has_the_release_names(vit):
    names = set(vit.state_dict())
    block = {f"transformer.resblocks.0.{n}" for n in (
        "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj.weight", "attn.in_proj.bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")}
    pool = {f"attn_pool.{n}" for n in (
        "pos_embed", "query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias")}
    top = {"conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias",
           "proj"}
    assert block | pool | top <= names
    assert len(names) == len(top) + len(pool) + 2 * len(block)
    assert vit.state_dict()["positional_embedding"].shape == (256, 24)  # 16 x 16, resized to the 32 x 32 patches


def release_forward(vit: QwenViT, pixels: torch.Tensor) -> torch.Tensor:
    """The tower as the release writes it: sequence-first, one fused projection split per head, bmm attention,
    positions resized bicubically, then the attention pool, ln_post and proj."""
    sd = {k: v.double() for k, v in vit.state_dict().items()}
    c = vit.config

    def resize(pos, n):
        s, t = math.isqrt(pos.shape[0]), math.isqrt(n)
        grid = pos.reshape(1, s, s, -1).permute(0, 3, 1, 2)
        return torch.nn.functional.interpolate(grid, size=(t, t), mode="bicubic", align_corners=False)\
            .permute(0, 2, 3, 1).flatten(0, 2)

    ln = lambda x, p: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa
    x = torch.nn.functional.conv2d(pixels.double(), sd["conv1.weight"], stride=c.patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = ln(x + resize(sd["positional_embedding"], x.shape[1]), "ln_pre").permute(1, 0, 2)  # LND
    hn = c.width // c.heads
    for i in range(c.layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        sq, b, _ = h.shape
        mixed = (h @ sd[p + "attn.in_proj.weight"].T + sd[p + "attn.in_proj.bias"]).view(sq, b, c.heads, 3 * hn)
        q, k, v = mixed.split(hn, dim=-1)
        q, k, v = (t.reshape(sq, b * c.heads, hn).transpose(0, 1) for t in (q, k, v))
        probs = torch.bmm(q / math.sqrt(hn), k.transpose(-2, -1)).softmax(-1)
        ctx = torch.bmm(probs, v).view(b, c.heads, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, c.width)
        x = x + ctx @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2")
        h = torch.nn.functional.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = x.permute(1, 0, 2)  # NLD
    key_pos = resize(sd["attn_pool.pos_embed"], x.shape[1])
    kv = ln(x @ sd["attn_pool.kv_proj.weight"].T, "attn_pool.ln_kv").permute(1, 0, 2)
    query = ln(sd["attn_pool.query"], "attn_pool.ln_q").unsqueeze(1).repeat(1, kv.shape[1], 1)
    attn = torch.nn.MultiheadAttention(c.output_dim, c.pool_heads).double()
    attn.load_state_dict({k[len("attn_pool.attn."):]: v for k, v in sd.items() if k.startswith("attn_pool.attn.")})
    out = attn(query + sd["attn_pool.pos_embed"].unsqueeze(1), kv + key_pos.unsqueeze(1), kv)[0].permute(1, 0, 2)
    return ln(out, "ln_post") @ sd["proj"]


def test_vision_tower_matches_the_release_definition(vit):
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        ours = vit(pixels)
        reference = release_forward(vit, pixels)
    assert ours.shape == (2, 256, 32)
    assert torch.allclose(ours.double(), reference, atol=1e-4), (ours.double() - reference).abs().max()


def test_negative_embeds_command_writes_what_the_loader_reads(vit, tmp_path):
    # the release's qwen_vit_G.pt (a plain state dict) and a Qwen-VL-Chat folder (transformer.visual.* shards)
    torch.save(vit.state_dict(), tmp_path / "qwen_vit_G.pt")
    chat = tmp_path / "Qwen-VL-Chat"
    chat.mkdir()
    state = {f"transformer.visual.{k}": v.contiguous() for k, v in vit.state_dict().items()}
    state["transformer.wte.weight"] = torch.zeros(4, 4)
    save_file(state, chat / "model-00001-of-00001.safetensors")
    (chat / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}))

    kwargs = dict(heads=TINY_VIT.heads, pool_heads=TINY_VIT.pool_heads)
    negative = build_negative_embeds(str(tmp_path / "qwen_vit_G.pt"), **kwargs)
    assert negative.shape == (NUM_IMAGE_TOKENS, 32) and negative.dtype == torch.float32
    with torch.no_grad():
        zero = release_forward(vit, torch.zeros(1, 3, 448, 448))[0]
    # consecutive tokens averaged 4 to 1, as F.avg_pool1d(kernel_size=4, stride=4) over the sequence
    assert torch.allclose(negative.double(), zero.view(64, 4, 32).mean(1), atol=1e-4)
    assert torch.equal(build_negative_embeds(str(chat), **kwargs), negative)

    out = tmp_path / "SEED-X" / NEGATIVE_FILE
    args = ["--vit", str(chat), "--out", str(out), "--heads", "4", "--pool-heads", "4"]
    main(args)
    assert torch.equal(torch.load(out, weights_only=True), negative)
    with pytest.raises(SystemExit):  # an existing file is kept unless --overwrite
        main(args)
    main(args + ["--overwrite"])

    # the SEED-X loader reads it as the negative branch
    seed_x = policies.build("seed_x", tiny=True)
    seed_x.save_pretrained(str(tmp_path / "SEED-X"))
    main(args + ["--overwrite"])
    loaded = policies.build("seed_x", model_name_or_path=str(tmp_path / "SEED-X"))
    assert torch.equal(loaded.negative_vit_embeds, negative)

    with pytest.raises(RuntimeError, match="Missing key"):  # a tower with a missing weight does not load
        broken = vit.state_dict()
        del broken["ln_post.bias"]
        torch.save(broken, tmp_path / "broken.pt")
        build_negative_embeds(str(tmp_path / "broken.pt"), **kwargs)
    with pytest.raises(FileNotFoundError, match="vision tower not found"):
        build_negative_embeds(str(tmp_path / "nowhere.pt"))


def release_style_tokenizer(folder, words: list[str], specials: list[str]) -> int:
    """A LLaMA-style slow tokenizer folder as the release ships it: a sentencepiece `tokenizer.model` plus
    `added_tokens.json`, no `tokenizer.json`. Returns the vocabulary size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words)] * 20), model_writer=model,
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "added_tokens.json").write_text(json.dumps({t: 60 + i for i, t in enumerate(specials)}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return 60 + len(specials)


def test_seed_x_loads_a_slow_sentencepiece_tokenizer(tmp_path):
    """sentencepiece is a dependency: the release's tokenizer folder loads as installed."""
    seed_x = policies.build("seed_x", tiny=True)
    seed_x.save_pretrained(str(tmp_path))
    tokenizer_dir = tmp_path / TOKENIZER_DIR
    for f in tokenizer_dir.iterdir():
        f.unlink()
    tokenizer_dir.rmdir()
    # the release's order: <img_00000>.. first, then <img>, </img>
    specials = [image_token(i) for i in range(NUM_IMAGE_TOKENS)] + ["<img>", "</img>"]
    vocab = release_style_tokenizer(tokenizer_dir, "a red cat sits on the blue mat generate an image of".split(),
                                    specials)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2))
    llm.save_pretrained(tmp_path / "llm")

    loaded = policies.build("seed_x", model_name_or_path=str(tmp_path))
    assert loaded.tokenizer.convert_tokens_to_ids(["<img_00000>", "<img>", "</img>"]) == [60, 124, 125]
    rollout = loaded.sample(PROMPTS, 1, generator=torch.Generator().manual_seed(0))
    assert rollout.completion_ids[0].tolist() == list(range(60, 124)) + [125]
    ids = loaded.tokenizer(loaded.format_prompt("a red cat"))["input_ids"]
    assert ids[0] == 1 and ids[-1] == 124 and len(ids) > 5  # BOS, sentencepiece pieces, then <img>
