"""A vision-language model asked about the image: score = P(yes) / (P(yes) + P(no)) for its answer.

The judge most recent image-token RL work uses next to detectors and preference models (T2I-R1's outcome reward,
VQAScore's P("Yes" | image, "Does this figure show {prompt}?"), ReasonGen-R1's and AR-GRPO's Qwen2.5-VL checks).
Built on transformers' image-text-to-text models with the Qwen-VL processor interface (`Qwen/Qwen2.5-VL-7B-Instruct`
by default; Qwen2-VL and Qwen3-VL load the same way), by hub id or local folder.

How a score is made: the image and the question go through the processor's chat template (system prompt, user turn
with the image and the question, generation prompt on), one forward, and the next-token distribution after it is
read at the tokenizer's yes and no tokens (every case and leading-space form that is a single token: "yes", "Yes",
"YES", " yes", ...). No generation. P(yes) and P(no) are the summed probabilities of their forms, and the score is
P(yes) / (P(yes) + P(no)), in [0, 1].

Decomposed questions (DSG / TIFA style): with `questions_key` set, a prompt whose metadata holds a list of questions
under that key ("is there a cat?", "is the cat black?") scores the mean over them; other prompts use `question`.
"""

from __future__ import annotations

import torch
from PIL import Image

from rewards.base import Reward
from rewards.models import batches, resolve_device, resolve_dtype

DEFAULT_QUESTION = "Does this image show {prompt}? Please answer yes or no."


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """The ids of `word`'s case and leading-space forms that are single tokens of `tokenizer`."""
    ids = set()
    for form in {word, word.capitalize(), word.upper(), " " + word, " " + word.capitalize(), " " + word.upper()}:
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
            ids.add(encoded[0])
    return sorted(ids)


class VLMJudgeReward(Reward):
    name = "vlm_judge"

    def __init__(self, model_name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct", question: str = DEFAULT_QUESTION,
                 system_prompt: str | None = "You are a helpful assistant.", questions_key: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, batch_size: int = 8,
                 device: str | None = None, dtype: str | None = None):
        check_question(question, questions_key)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        pixels = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels).items() if v is not None}
        self.processor = AutoProcessor.from_pretrained(model_name_or_path, **pixels)
        self.processor.tokenizer.padding_side = "left"  # the last position is every row's answer position
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.question, self.system_prompt, self.questions_key = question, system_prompt, questions_key
        self.batch_size = batch_size
        tokenizer = self.processor.tokenizer
        self.yes_ids, self.no_ids = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"{model_name_or_path}: the tokenizer has no single-token yes/no answers "
                             f"(yes {self.yes_ids}, no {self.no_ids})")

    def questions_for(self, prompt: str, metadata: dict | None) -> list[str]:
        listed = (metadata or {}).get(self.questions_key) if self.questions_key else None
        if listed:
            if not isinstance(listed, list) or not all(isinstance(q, str) and q.strip() for q in listed):
                raise ValueError(f"metadata[{self.questions_key!r}] must be a list of question strings, got {listed!r}")
            return listed
        return [self.question.format(prompt=prompt)]

    def chat_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def yes_probabilities(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) per (image, question) pair, float32 on CPU."""
        out = []
        for part in batches(len(images), self.batch_size):
            inputs = self.processor(text=[self.chat_text(q) for q in questions[part]],
                                    images=[im.convert("RGB") for im in images[part]], padding=True,
                                    return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            yes = torch.logsumexp(logprobs[:, self.yes_ids], dim=-1)
            no = torch.logsumexp(logprobs[:, self.no_ids], dim=-1)
            out.append(torch.sigmoid(yes - no).cpu())  # = P(yes) / (P(yes) + P(no))
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts, metadata):
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        pairs = [(i, q) for i, (p, m) in enumerate(zip(prompts, metadata)) for q in self.questions_for(p, m)]
        probabilities = self.yes_probabilities([images[i] for i, _ in pairs], [q for _, q in pairs])
        totals, counts = [0.0] * len(images), [0] * len(images)
        for (i, _), p in zip(pairs, probabilities.tolist()):
            totals[i] += p
            counts[i] += 1
        return [t / c for t, c in zip(totals, counts)]


def check_question(question: str, questions_key: str | None) -> None:
    """The template must ask about the prompt ({prompt}) unless the questions come from the metadata, and hold no
    other placeholder."""
    if "{prompt}" not in question and questions_key is None:
        raise ValueError(f"question {question!r} must contain {{prompt}} (or set questions_key to read the questions "
                         "from each prompt's metadata)")
    try:
        question.format(prompt="x")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"question {question!r} is not a valid template with only {{prompt}}: {error!r}") from None
