"""The HuatuoGPT-o1 recipe (METHOD B): verifiable problems -> verifier-guided reasoning search -> SFT -> RL.

Roles: teacher = the search generator (GPT-4o in the paper), judge = the verifier, student = the policy.
`search` is the search's control (strategy choice and bookkeeping), free of Ray and engines.
"""
