"""Reading model replies: pure functions over strings, importable anywhere (Ray map functions, reward
functions, tests).

- `replies`: the Self-Play `<think>/<answer>` and HuatuoGPT-o1 `## Thinking / ## Final Response` formats,
  the option letters a reply commits to, the judge's verdict token;
- `o1`: the HuatuoGPT-o1 generator's JSON chains, filter and True/False verdicts, and its SFT format.
"""
