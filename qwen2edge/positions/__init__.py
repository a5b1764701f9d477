"""Position arithmetic shared by the exporter and the torch-free runtime (pure numpy).

`rope`: rotary cos/sin tables (plain RoPE and YaRN), baked into the graph at export.
`dca`: Dual Chunk Attention's wrapped rotary indices and chunk ids, fed by the runtime per step.
"""
