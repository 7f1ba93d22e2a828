rule data:
    output:
        outputs("data"),
    params:
        cmd=cmd("data"),
    log:
        f"{ROOT}logs/data/{{dataset}}.log",
    benchmark:
        f"{ROOT}benchmarks/data/{{dataset}}.tsv"
    threads: 1
    resources:
        runtime=RUNTIME.get("data", 60),
        mem_mb=MEM_MB,
    shell:
        "{params.cmd} > {log} 2>&1"
