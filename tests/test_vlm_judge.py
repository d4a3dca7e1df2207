"""The VLM-judge reward on a tiny random-weight Qwen2.5-VL built in code (the real architecture, processor and
chat-template path), saved with save_pretrained and loaded back through the reward's own from_pretrained code."""

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

import rewards
from rewards.vlm_judge import VLMJudgeReward, answer_token_ids

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
            "<|endoftext|>"]
WORDS = ("does this image show a red cat blue dog please answer yes or no ? . is there the black you are helpful "
         "assistant system user Yes No YES NO").split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def save_tiny_judge(path) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS + ["<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def judge_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen_vl")
    save_tiny_judge(path)
    return str(path)


@pytest.fixture(scope="module")
def judge(judge_path):
    return rewards.build("vlm_judge", model_name_or_path=judge_path, batch_size=4, questions_key="questions")


def picture(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    image.paste(Image.new("RGB", (size // 2, size // 2), (255 - colour[0], 80, 160)), (0, 0))
    return image


def test_yes_and_no_forms_are_the_single_token_variants(judge):
    tokenizer = judge.processor.tokenizer
    assert sorted(tokenizer.convert_ids_to_tokens(judge.yes_ids)) == ["YES", "Yes", "yes"]
    assert sorted(tokenizer.convert_ids_to_tokens(judge.no_ids)) == ["NO", "No", "no"]
    assert answer_token_ids(tokenizer, "maybe") == []


def test_score_is_the_yes_share_of_one_forward(judge):
    image, prompt = picture((200, 30, 30)), "a red cat"
    score = judge([image], [prompt], [{}])[0]
    # by hand: the chat text, the processor, one forward, a softmax over the vocabulary at the last position
    text = judge.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
         {"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": f"Does this image show {prompt}? Please answer yes "
                                                               "or no."}]}],
        tokenize=False, add_generation_prompt=True)
    inputs = judge.processor(text=[text], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == judge.model.config.image_token_id).sum() > 1  # the image is in the context
    with torch.no_grad():
        probs = torch.softmax(judge.model(**inputs).logits[0, -1].double(), dim=-1)
    yes, no = probs[judge.yes_ids].sum(), probs[judge.no_ids].sum()
    assert score == pytest.approx(float(yes / (yes + no)), abs=1e-5)
    assert 0.0 < score < 1.0


def test_batched_equals_one_by_one(judge):
    images = [picture((200, 30, 30)), picture((30, 30, 200), 96), picture((30, 200, 30), 48)]
    prompts = ["a red cat", "a blue dog is there", "a cat"]  # different lengths: left padding in the batch
    batched = judge(images, prompts, [{}] * 3)
    single = [judge([im], [p], [{}])[0] for im, p in zip(images, prompts)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3


def test_metadata_questions_are_averaged(judge):
    image = picture((200, 30, 30))
    questions = ["is there a cat ?", "is the cat black ?"]
    averaged = judge([image], ["a black cat"], [{"questions": questions}])[0]
    each = [float(judge.yes_probabilities([image], [q])[0]) for q in questions]
    assert averaged == pytest.approx(sum(each) / 2, abs=1e-6)
    assert each[0] != pytest.approx(each[1], abs=1e-6)
    with pytest.raises(ValueError, match="must be a list of question strings"):
        judge([image], ["a cat"], [{"questions": "is there a cat?"}])


def test_bad_templates_are_clear_errors(judge_path):
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        VLMJudgeReward(judge_path, question="Is this a good image?")
    with pytest.raises(ValueError, match="not a valid template"):
        VLMJudgeReward(judge_path, question="Does it show {prompt} in {style}?")
    VLMJudgeReward(judge_path, question="Is it right?", questions_key="questions")  # questions from metadata
