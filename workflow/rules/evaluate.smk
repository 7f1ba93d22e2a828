rule evaluate:
    input:
        "data/{dataset}/train.npz",
        "data/{dataset}/test.npz",
        "results/{dataset}/{arch}/{tm}/{model}/checkpoint.pt",
    output:
        "results/{dataset}/{arch}/{tm}/{model}/eval_per_image.npz",
        "results/{dataset}/{arch}/{tm}/{model}/eval.json",
    params:
        cmd=cmd("evaluate"),
    log:
        "logs/evaluate/{dataset}/{arch}/{tm}/{model}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}/{arch}/{tm}/{model}.tsv"
    threads: THREADS.get("evaluate", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("evaluate", 240),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
