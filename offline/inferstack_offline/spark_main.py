"""The file spark-submit runs for `inferstack batch` (it needs a .py file, not a console script):

    spark-submit --master k8s://https://API:6443 ... \
        local:///opt/venv/lib/python3.12/site-packages/inferstack_offline/spark_main.py INPUT --out OUT
"""

from inferstack_offline.batch import main

if __name__ == "__main__":
    main()
