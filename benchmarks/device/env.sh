# Sourced on the GPU machine before running quiver from the carried working tree (its root):
# the carried wheels, the tree itself and the assembled model on the path, nothing online.
export PYTHONPATH=/tmp/site:$PWD:/root/dev/llm
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
quiver() { python3 -m quiver.cli "$@"; }
