"""A LangChain chain over the Serve application's handle: invoke, batch, stream, async.

With `make serve` (or `serve run serve_config.yaml`) running on this machine, or RAY_ADDRESS
naming the cluster that runs it:

    .venv/bin/python examples/langchain_chain.py

Without a running application, `--deploy` starts a Ray of its own and deploys the demo
checkpoint (`make demo-checkpoint`) first, as IpexLLM.from_model_id_low_bit would load it:

    .venv/bin/python examples/langchain_chain.py --deploy
"""

from __future__ import annotations

import argparse
import asyncio
import time

from langchain_core.prompts import PromptTemplate

from langchain_adapter import RayServeLLM

QUESTIONS = ["What is the capital of France?", "What is the capital of Germany?",
             "What is the capital of Japan?", "What is the capital of Egypt?"]
# LangChain IpexLLM's model_kwargs keep their meaning: greedy, at most 64 tokens.
MODEL_KWARGS = {"temperature": 0, "max_length": 64}


def make_llm(deploy: bool) -> RayServeLLM:
    if not deploy:
        # Connects to RAY_ADDRESS, else to the Ray cluster running on this machine.
        return RayServeLLM(app_name="llm", chat_template=True, model_kwargs=MODEL_KWARGS)
    import ray

    from deployments.constants import DEMO_CHECKPOINT_DIR

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    return RayServeLLM.from_model_id_low_bit(DEMO_CHECKPOINT_DIR, model_kwargs=MODEL_KWARGS,
                                             chat_template=True)


async def ask_async(chain, question: str) -> None:
    print("astream:", end=" ", flush=True)
    async for chunk in chain.astream({"question": question}):
        print(chunk, end="", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", action="store_true",
                        help="start a local Ray and deploy the demo checkpoint first")
    llm = make_llm(parser.parse_args().deploy)
    # chat_template=True: the replica frames each prompt with the model's chat template.
    # The demo model is a 135M instruct model that answers this raw prompt poorly.
    chain = PromptTemplate.from_template("USER: {question}\nASSISTANT:") | llm

    print("invoke:", chain.invoke({"question": QUESTIONS[0]}))

    started = time.monotonic()
    answers = chain.batch([{"question": q} for q in QUESTIONS])  # sent at once, batched
    print(f"batch of {len(answers)} in {time.monotonic() - started:.1f} s:")
    for question, answer in zip(QUESTIONS, answers, strict=True):
        print(f"  {question} -> {answer.strip()}")

    print("stream:", end=" ", flush=True)
    for chunk in chain.stream({"question": QUESTIONS[1]}):
        print(chunk, end="", flush=True)  # text as the replica produces it
    print()

    asyncio.run(ask_async(chain, QUESTIONS[2]))


if __name__ == "__main__":
    main()
