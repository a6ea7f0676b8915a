"""Constants used across the package, in one module that imports nothing: the configuration
imports it relatively, so its remote-code copy (:mod:`goom_ssm.hub`) carries this small file
and nothing else."""

ENDOFTEXT_ID = 50256  # GPT-2's <|endoftext|>: the EOS (and BOS) id of the GPT-2 vocabulary
GPT2_VOCAB_SIZE = 50257  # 256 single bytes + 50,000 merges + <|endoftext|>
SCAN_IMPLEMENTATIONS = ("auto", "triton", "chunked", "goom_prefix")
STATE_OUTPUT_LOG_SCALE = 2.0  # the SSM reads each scaled state row at a largest magnitude of e^2
NO_STATE_LOG_SCALE = -1e30  # log-scale of "no state": a zero row that any input outweighs (a reset's, a chunk's start)
