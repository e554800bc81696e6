"""Re-export of `finetune_contract.spec`: the operator and the trainer share one definition (the contract).

The module object itself is aliased, not copied, so `finetune_operator.api.spec is finetune_contract.spec`.
"""

import sys

import finetune_contract.spec as _contract

sys.modules[__name__] = _contract
