"""Train MEDUSA-1 heads on your own GPT-2 checkpoint and JSONL data, then decode with them.

    python examples/train_medusa_heads.py --base PATH_OR_HF_NAME --data my_data.jsonl --out runs/medusa

The base (a Hugging Face GPT-2 directory or hub name, or an mtpkern run or checkpoint directory)
stays frozen; only the heads train. The data is JSONL with MetaMathQA's fields: {"query": ..., "response": ...}.
Greedy MEDUSA decoding is lossless: the script checks that its output equals plain greedy.
"""

import argparse

import torch

from mtpkern import generate, load_model
from mtpkern.data import format_prompt, load_records, load_tokenizer
from mtpkern.train import TrainConfig, train
from mtpkern.tree import Tree


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True,
                   help="a Hugging Face GPT-2 (directory or hub name), or an mtpkern run or checkpoint directory")
    p.add_argument("--data", required=True, help="a .jsonl / .json file of {query, response} records")
    p.add_argument("--out", required=True)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    result = train(TrainConfig(objective="medusa", base=args.base, data=args.data, out=args.out,
                               n_heads=1 + args.heads, steps=args.steps, batch_size=args.batch_size,
                               device=args.device, progress=False))
    print(f"heads trained: {result.checkpoint}; top-1 accuracy per head {result.head_acc}")

    model = load_model(result.checkpoint)
    tokenizer = load_tokenizer(result.checkpoint)
    query = load_records(args.data, limit=1)[0]["query"]
    ids = torch.tensor(tokenizer(format_prompt(query))["input_ids"])
    tree = Tree.from_widths([3] + [1] * (args.heads - 1))
    budget = min(64, model.config.n_positions - len(ids) - len(tree) + 2)  # what the context leaves
    medusa = generate(model, ids, max_new_tokens=budget, strategy="medusa", tree=tree,
                      eos_token_id=tokenizer.eos_token_id)
    plain = generate(model, ids, max_new_tokens=budget, strategy="ntp", eos_token_id=tokenizer.eos_token_id)
    assert medusa.tokens == plain.tokens, "MEDUSA greedy output must equal plain greedy output"
    print(tokenizer.decode(medusa.tokens, skip_special_tokens=True))
    print(f"{plain.num_steps} forward passes plain, {medusa.num_steps} with MEDUSA "
          f"(mean accepted length {medusa.mean_accept_length:.2f})")


if __name__ == "__main__":
    main()
