{
  "algorithm": "ed25519",
  "key_id": "73dba17c61e6c283",
  "signature": "ffe59ca59633c8ebfafcf7c31c0fa725745ff59c601b2ab6c0e1812fdabace183a3d38e3e5ab67de3d523934a6a97f57fc65c5ad199f76d71038e81c7866dd02"
}
