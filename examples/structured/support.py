"""A customer-service turn with a tool: the model calls lookup_order, the shop answers the call from its
own data, and the model replies from the tool's result. Talks to `aigc serve` through the official
`openai` client, as any OpenAI-compatible app would.

    aigc serve smollm2-135m --port 8000 &   # then:
    python support.py [--base-url http://127.0.0.1:8000/v1] [--seed 7]
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

ORDERS = {"AB123": {"status": "shipped", "carrier": "DHL", "expected": "2026-12-05"}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by its id (two capital letters and three digits).",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
                "required": ["order_id"],
                "additionalProperties": False,
            },
        },
    }
]


def lookup_order(order_id: str) -> dict:
    return ORDERS.get(order_id, {"error": f"no order {order_id}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a polite customer-service agent for an online shop."},
        {"role": "user", "content": "Hi, where is my order AB123?"},
    ]
    # The 135M model rarely decides to call a tool by itself (tool_choice "auto"), so the shop asks for one.
    first = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="required", temperature=0.8, seed=args.seed
    )
    call = first.choices[0].message.tool_calls[0]
    print(f"tool call: {call.function.name}({call.function.arguments})")
    result = lookup_order(**json.loads(call.function.arguments))
    print(f"tool result: {json.dumps(result)}")
    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    answer = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0.3, seed=args.seed,
        max_tokens=80,
    )  # fmt: skip
    print(f"assistant: {answer.choices[0].message.content}")


if __name__ == "__main__":
    main()
