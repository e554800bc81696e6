"""Re-export of `finetune_contract.rules`: the operator and the trainer share one definition (the contract).

The module object itself is aliased, not copied, so `finetune_operator.api.rules is finetune_contract.rules`.
"""

import sys

import finetune_contract.rules as _contract

sys.modules[__name__] = _contract
