"""Re-export of `finetune_contract.early_stopping`: the operator and the trainer share one definition (the contract).

The module object itself is aliased, not copied, so `finetune_operator.api.early_stopping is finetune_contract.early_stopping`.
"""

import sys

import finetune_contract.early_stopping as _contract

sys.modules[__name__] = _contract
