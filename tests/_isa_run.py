"""Runs the determinism cases with the instruction set named by PYFUSED_CPU_ISA (read when
pyfused._C loads) and saves every param and state tensor to argv[1]; prints the ISA used.
Run by test_optim_parity.test_bitwise_identical_across_instruction_sets."""

import json
import sys

import torch

from pyfused import _cpp
from pyfused.check import optim_cases as oc

CASES = ["SGD-nesterov_wd_maximize", "Adagrad-all", "RMSprop-all", "Adam-amsgrad_wd_maximize", "AdamW-tensor_lr", "Adadelta-all"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (1, 7, 33, 4097, 100_003)

if __name__ == "__main__":
    results = {}
    for case_id in CASES:
        for name, dtype in DTYPES.items():
            run = oc.run_pyfused(oc.CASES_BY_ID[case_id], (dtype,), SIZES)
            results[f"{case_id}-{name}"] = oc.snapshot(run)
    torch.save(results, sys.argv[1])
    print(json.dumps({"isa": _cpp.isa(), "threads": torch.get_num_threads()}))
