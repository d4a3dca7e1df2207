"""CLIP, PickScore, HPSv2, aesthetic and GenEval rewards end to end on tiny random-weight models.

Each tiny model is saved in its release format (open_clip `local-dir` folder or a checkpoint file with a
`state_dict` entry, transformers `save_pretrained` folders, the aesthetic head's `.pth`) and loaded back through the
rewards' own loading code. A random model cannot show real behaviour, so the tests check numbers that must match:
scores recomputed independently, batched equal to one by one, dtype honoured, GenEval plumbing consistent with the
pure rules.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.models import open_clip_quick_gelu

TINY_OPEN_CLIP = {"embed_dim": 32, "quick_gelu": True,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
PROMPTS = ["a photo of a red car", "a dog", "two cats on a bench, in the snow"]


def images(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """A tiny open_clip model in the hub's `local-dir` layout: open_clip_config.json + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_open_clip")
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    save_file(model.state_dict(), str(path / "open_clip_model.safetensors"))
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}))
    return path


def test_quick_gelu_follows_the_released_weights(open_clip_dir):
    assert open_clip_quick_gelu("ViT-L-14", "openai") is True  # open_clip 3.3 would build GELU without this
    assert open_clip_quick_gelu("ViT-H-14", "laion2b_s32b_b79k") is False
    reward = rewards.build("clip", model_name=f"local-dir:{open_clip_dir}", pretrained=None, device="cpu")
    from open_clip.transformer import QuickGELU

    assert any(isinstance(m, QuickGELU) for m in reward.model.modules())
    with pytest.raises(ValueError, match="no pretrained tag 'opneai'"):
        rewards.build("clip", pretrained="opneai", device="cpu")


def test_clip_score_is_100_cos_batched_and_dtype(open_clip_dir):
    import open_clip

    reward = rewards.build("clip", model_name=f"local-dir:{open_clip_dir}", divide_by=1.0, batch_size=2,
                           device="cpu")
    ims = images()
    scores = reward(ims, PROMPTS, [{}] * 3)

    # Independently: the saved weights in a freshly built model, through open_clip's forward.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    model.eval()
    with torch.no_grad():
        img, txt, _ = model(torch.stack([preprocess(im) for im in ims]),
                            open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")(PROMPTS))
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in scores)) == 3  # the prompts and images do matter

    one_by_one = [reward([im], [p], [{}])[0] for im, p in zip(ims, PROMPTS)]
    assert one_by_one == pytest.approx(scores, abs=1e-4)
    scaled = rewards.build("clip", model_name=f"local-dir:{open_clip_dir}", device="cpu")  # default: / 30
    assert scaled(ims, PROMPTS, [{}] * 3) == pytest.approx([s / 30 for s in scores], abs=1e-5)

    half = rewards.build("clip", model_name=f"local-dir:{open_clip_dir}", divide_by=1.0, device="cpu",
                         dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert next(half.model.parameters()).device == torch.device("cpu")
    assert half(ims, PROMPTS, [{}] * 3) == pytest.approx(scores, abs=3.0)  # bf16 over a 100x scale


def test_hpsv2_loads_a_released_format_checkpoint(tmp_path):
    import open_clip

    (tmp_path / "tiny-hps.json").write_text(json.dumps({k: v for k, v in TINY_OPEN_CLIP.items() if k != "quick_gelu"}))
    open_clip.add_model_config(tmp_path / "tiny-hps.json")
    model = open_clip.create_model("tiny-hps").eval()
    # HPS_v2*.pt layout: a torch file whose `state_dict` entry is the whole CLIP.
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = rewards.build("hpsv2", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"), model_name="tiny-hps",
                           device="cpu", batch_size=2)
    ims = images()
    preprocess = open_clip.create_model_and_transforms("tiny-hps")[2]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in ims]), normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer("tiny-hps")(PROMPTS), normalize=True)
    assert reward(ims, PROMPTS, [{}] * 3) == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)

    state = model.state_dict()
    state.pop("logit_scale")
    torch.save({"state_dict": state}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['logit_scale'\]"):
        rewards.build("hpsv2", checkpoint=str(tmp_path / "broken.pt"), model_name="tiny-hps", device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        rewards.build("hpsv2", checkpoint=str(tmp_path / "nothing.pt"), model_name="tiny-hps", device="cpu")


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + image processor + tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.replace(",", " ").split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", padding_side="right")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("tiny_hf_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_pickscore_is_logit_scale_times_cos(hf_clip_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    reward = rewards.build("pickscore", model_name_or_path=str(hf_clip_dir), processor_name_or_path=str(hf_clip_dir),
                           device="cpu", batch_size=2)
    ims = images()
    scores = reward(ims, PROMPTS, [{}] * 3)
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(hf_clip_dir)(images=ims, return_tensors="pt")["pixel_values"]
    text = AutoTokenizer.from_pretrained(hf_clip_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixels, **text).logits_per_image  # logit_scale.exp() * cos, all pairs
    assert scores == pytest.approx((logits.diagonal() / 26).tolist(), abs=1e-5)
    assert [reward([im], [p], [{}])[0] for im, p in zip(ims, PROMPTS)] == pytest.approx(scores, abs=1e-5)
    half = rewards.build("pickscore", model_name_or_path=str(hf_clip_dir), processor_name_or_path=str(hf_clip_dir),
                         device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    assert half(ims, PROMPTS, [{}] * 3) == pytest.approx(scores, abs=0.05)


def test_aesthetic_head_on_normalised_clip_embedding(hf_clip_dir, tmp_path):
    from transformers import AutoImageProcessor, CLIPModel

    from rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    head = AestheticMLP(dim=16)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")  # the released layout
    reward = rewards.build("aesthetic", clip_name_or_path=str(hf_clip_dir),
                           head=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), device="cpu", batch_size=2)
    ims = images()
    scores = reward(ims, ["ignored"] * 3, [{}] * 3)

    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(hf_clip_dir)(images=ims, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model(pixel_values=pixels, input_ids=torch.ones(3, 2, dtype=torch.long)).image_embeds
        x = emb / emb.norm(dim=-1, keepdim=True)
        for key in ("0", "2", "4", "6", "7"):  # linear layers only: the released MLP has no activations
            x = x @ head.state_dict()[f"layers.{key}.weight"].T + head.state_dict()[f"layers.{key}.bias"]
    assert scores == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3

    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="missing"):
        rewards.build("aesthetic", clip_name_or_path=str(hf_clip_dir), head=str(tmp_path / "wrong.pth"),
                      device="cpu")


def save_tiny_mask2former(path, num_labels=80):
    """Mask2Former with a tiny Swin backbone, saved with save_pretrained next to its image processor."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    backbone = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, num_queries=12, hidden_dim=32,
                               mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64,
                               use_pretrained_backbone=False)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    return save_tiny_mask2former(tmp_path_factory.mktemp("tiny_mask2former"))


def test_geneval_reward_end_to_end(mask2former_dir, open_clip_dir, tmp_path):
    from grpo_img.data import load_prompts
    from rewards.geneval import COCO_CLASSES, GenEvalOptions, mask_box, relative_position
    from rewards.geneval_prompts import write_geneval_metadata

    reward = rewards.build("geneval", detector=str(mask2former_dir), clip_model=f"local-dir:{open_clip_dir}",
                           clip_pretrained=None, shortest_edge=64, longest_edge=96, device="cpu", batch_size=2)
    assert reward.processor.size == {"shortest_edge": 64, "longest_edge": 96}  # the option beats the saved config
    ims = images(4, size=40)
    detections = reward.detect(ims)
    for image, dets in zip(ims, detections):
        assert len(dets) > 0
        for d in dets:
            assert d.label in COCO_CLASSES and 0.0 <= d.score <= 1.0
            assert d.mask.shape == (image.height, image.width) and d.box == mask_box(d.mask)
            assert 0 <= d.box[0] < d.box[2] <= image.width and 0 <= d.box[1] < d.box[3] <= image.height

    # Prompts about what the random detector does see, so that every rule runs; GenEval metadata travels from a
    # JSONL prompt file through the trainer's loader to the reward.
    first = [sorted(dets, key=lambda d: -d.score)[0] for dets in detections]
    labels = [sorted({d.label for d in dets}) for dets in detections]
    n_first = sum(d.label == first[2].label for d in detections[2])
    a, b = labels[3][:2]
    records = [
        {"tag": "single_object", "include": [{"class": first[0].label, "count": 1}], "prompt": "p0"},
        {"tag": "colors", "include": [{"class": first[1].label, "count": 1, "color": "red"}], "prompt": "p1"},
        {"tag": "counting", "include": [{"class": first[2].label, "count": n_first}],
         "exclude": [{"class": first[2].label, "count": n_first + 1}], "prompt": "p2"},
        {"tag": "position", "include": [{"class": a, "count": 1}, {"class": b, "count": 1,
                                                                   "position": ["left of", 0]}], "prompt": "p3"},
    ]
    write_geneval_metadata(records, tmp_path / "geneval.jsonl")
    loaded = load_prompts(str(tmp_path / "geneval.jsonl"))
    metadata = [r.metadata for r in loaded]

    # A random detector is never confident: at GenEval's thresholds nothing is found and nothing is correct.
    strict = reward.evaluate(ims, metadata)
    assert [r.correct for r in strict] == [False] * 4 and strict[0].score == 0.0
    assert "found 0" in strict[0].reason

    # With the thresholds at 0 every detection counts.
    reward.options = GenEvalOptions(threshold=0.0, counting_threshold=0.0)
    results = reward.evaluate(ims, metadata)
    assert results[0].correct and results[0].score == 1.0
    red = reward.classify_colors(ims[1], [first[1]], first[1].label) == ["red"]
    assert results[1].correct is red and results[1].score == (1.0 if red else 0.5)
    assert results[2].correct and results[2].score == 1.0
    boxes = [sorted((d for d in detections[3] if d.label == c), key=lambda d: -d.score)[0].box for c in (b, a)]
    assert results[3].correct is ("left of" in relative_position(*boxes))
    composite = rewards.build_composite([{"name": "geneval", "detector": str(mask2former_dir),
                                          "clip_model": f"local-dir:{open_clip_dir}", "clip_pretrained": None,
                                          "shortest_edge": 64, "longest_edge": 96, "threshold": 0.0,
                                          "counting_threshold": 0.0, "device": "cpu"}])
    assert composite(ims, [r.prompt for r in loaded], metadata) == [r.score for r in results]
    metadata[2]["include"][0]["count"] += 1
    metadata[2]["exclude"][0]["count"] += 1
    assert not reward.evaluate(ims[2:3], metadata[2:3])[0].correct

    with pytest.raises(ValueError, match="not one of the 80 COCO classes"):
        reward.evaluate(ims[:1], [{"tag": "single_object", "include": [{"class": "unicorn", "count": 1}]}])
    with pytest.raises(ValueError, match="needs 'tag' and 'include'"):
        reward(ims[:1], ["a photo"], [{}])


def test_geneval_colour_sees_only_the_masked_object(mask2former_dir, open_clip_dir):
    from rewards.geneval import Detection

    reward = rewards.build("geneval", detector=str(mask2former_dir), clip_model=f"local-dir:{open_clip_dir}",
                           clip_pretrained=None, shortest_edge=64, longest_edge=96, device="cpu")
    weights = reward._color_classifier("car")
    assert weights.shape[1] == 10 and torch.allclose(weights.norm(dim=0), torch.ones(10), atol=1e-5)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:25] = True
    det = Detection("car", 0.99, (5.0, 10.0, 25.0, 30.0), mask=mask)
    image = images(1, size=40)[0]
    base = reward.color_logits(image, [det], "car")
    outside = np.asarray(image).copy()
    outside[~mask] = 255 - outside[~mask]
    assert torch.allclose(reward.color_logits(Image.fromarray(outside), [det], "car"), base)
    inside = np.asarray(image).copy()
    inside[mask] = 255 - inside[mask]
    assert not torch.allclose(reward.color_logits(Image.fromarray(inside), [det], "car"), base)


def test_geneval_needs_an_80_class_detector(tmp_path, open_clip_dir):
    save_tiny_mask2former(tmp_path / "m2f", num_labels=3)
    with pytest.raises(ValueError, match="has 3 classes"):
        rewards.build("geneval", detector=str(tmp_path / "m2f"), clip_model=f"local-dir:{open_clip_dir}",
                      clip_pretrained=None, device="cpu")
