# base3: HEAD with the old split rule (no doubling over a 16-bit cache; (128, 8) at 4+ splits), for A/B on one machine.
# Run here (not on the device): bash devscratch/mkbase3.sh
set -e
rm -rf devscratch/base3 && mkdir -p devscratch/base3
git archive HEAD serve_app benchmarks/*.py benchmarks/loadgen deployments.gpu.yaml deployments.yaml pyproject.toml | tar -x -C devscratch/base3
f=devscratch/base3/serve_app/engine/_private/attention.py
sed -i 's/        want \*= 2/        pass/' $f
sed -i 's/    return DECODE_CONFIG_16BIT_MANY_SPLITS if splits >= 9 else DECODE_CONFIG/    return DECODE_CONFIG_16BIT_MANY_SPLITS if splits >= 4 else DECODE_CONFIG/' $f
grep -n "        pass$\|splits >= 4" $f
du -sh devscratch/base3
