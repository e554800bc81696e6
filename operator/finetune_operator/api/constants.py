"""Re-export of `finetune_contract.constants`: the operator and the trainer share one definition (the contract).

The module object itself is aliased, not copied, so `finetune_operator.api.constants is finetune_contract.constants`.
"""

import sys

import finetune_contract.constants as _contract

sys.modules[__name__] = _contract
