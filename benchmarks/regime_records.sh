#!/usr/bin/env bash
# Every record of the per-regime instrument (issue 15), in the order they were made. Each step skips the runs
# that already finished (runs/bench/<run>/test_metrics.json), so the script resumes where it stopped.
#
#   bash benchmarks/regime_records.sh            # all of it (several hours on 2 cores)
#   bash benchmarks/regime_records.sh base       # only the base models' records
#   bash benchmarks/regime_records.sh llactr_smollm2 ml-1m   # only that record's ML-1M part
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
what=${1:-all}
only=${2:-}  # a dataset (ml-100k, ml-1m): run only its part of a record that covers both
ALL_BACKBONES="fm deepfm dcnv2 wukong finalmlp autoint"

base() {
  $PY -m benchmarks.quality --dataset ml-100k
  $PY -m benchmarks.quality --dataset ml-1m
  $PY -m benchmarks.quality --dataset ml-1m --split cold_item
  $PY -m benchmarks.quality --dataset ml-1m --train-fraction 0.05
}

# The dataset, the fine-tuned field model, its field table and the seeded random control table: $1 dataset,
# $2 prepared name, then the split flags
llactr_tables() {
  local dataset=$1 data=$2 flags=("${@:3}")
  local fields=runs/models/$data-fields features=runs/features/$data
  [ -f "runs/data/$data/schema.json" ] || $PY -m recsys.prepare --dataset "$dataset" "${flags[@]}" \
    --out "runs/data/$data" --no-progress
  # the budget is a safety net the 3 epochs never reach (about 75 s alone): a time-cut fine-tuning would make
  # the table depend on the machine's load (27 steps instead of 141 on ML-1M cold-item beside another job)
  [ -f "$fields/report.json" ] || $PY -m embedding_jobs.field_finetune --dataset runs/data/$data --out "$fields" \
    --time-budget-s 3600 --no-progress
  [ -f "$features/field/table.parquet" ] || $PY -m embedding_jobs.run --entity field --dataset runs/data/$data \
    --model "$fields" --out "$features" --no-progress
  [ -f "runs/features/$data-random/field/table.parquet" ] || $PY -m benchmarks.random_field_table \
    --like "$features/field" --out "runs/features/$data-random"
}

# LLaCTR on a field table and on its seeded random control, DeepFM and DCNv2: $1 dataset, $2 variant prefix,
# $3 the table's folder (the control's: <folder>-random), $4 "" or _centered (the field vectors centred), then
# the split flags. Variants: <prefix><suffix> and <prefix>_random<suffix>
llactr_pair() {
  local dataset=$1 prefix=$2 features=$3 suffix=$4 flags=("${@:5}") extra=()
  [ -z "$suffix" ] || extra=(method.llactr.center_fields=true)
  for table in "" _random; do
    $PY -m benchmarks.quality --dataset "$dataset" "${flags[@]}" --backbones deepfm dcnv2 \
      --variant "$prefix$table$suffix" method.name=llactr "method.llactr.field_table=$features${table/_/-}/field" \
      "${extra[@]}"
  done
}

# LLaCTR and its control (seeded random field vectors) on one prepared dataset: $1 dataset, $2 split flag
llactr() {
  local dataset=$1 data=$2 flags=("${@:3}")
  local fields=runs/models/$data-fields features=runs/features/$data
  llactr_tables "$@"
  llactr_pair "$dataset" llactr "$features" "" "${flags[@]}"
  $PY -m benchmarks.compare --data "$data" --variants llactr llactr_random --backbones deepfm dcnv2 \
    --out "compare_${data}_llactr"
  $PY -m benchmarks.compare --data "$data" --variants llactr --reference llactr_random --backbones deepfm dcnv2 \
    --out "compare_${data}_llactr_vs_random"
  # the field similarities FIE works from: fine-tuned, untuned (the packaged MiniLM) and random tables
  [ -f "runs/features/$data-untuned/field/table.parquet" ] || $PY -m embedding_jobs.run --entity field \
    --dataset runs/data/$data --out "runs/features/$data-untuned" --no-progress
  $PY -m benchmarks.field_similarity --dataset runs/data/$data --table "fine-tuned=$features/field" \
    --table "untuned=runs/features/$data-untuned/field" --table "random=runs/features/$data-random/field" \
    --report "$fields/report.json"
}

# LLaCTR with the loss weights chosen on validation (benchmarks.llactr_sweep, one seed, the reference's sum
# reduction), 5 seeds, against the same weights on the random table and against the base; $3 the adaptor
# (full: w = A s + b; scalar: w = a s + b, where only the similarities can tell the pairs apart), $4 the
# backbones (one word), then the split flags. Backbones the sweep's record lacks are swept by coordinate search
# (11 cells of the 6x6 grid; DeepFM and DCNv2 on ML-1M cold-item have the whole grid)
llactr_tuned() {
  local dataset=$1 data=$2 adaptor=$3 flags=("${@:5}") backbones missing
  read -ra backbones <<< "$4"
  local suffix=${adaptor/full/tuned}
  local features=runs/features/$data sweep=benchmarks/results/llactr_sweep_$data.json
  llactr_tables "$dataset" "$data" "${flags[@]}"
  missing=$($PY -c "import json, pathlib, sys; p = pathlib.Path('$sweep')
have = json.loads(p.read_text())['backbones'] if p.is_file() else {}
print(' '.join(b for b in sys.argv[1:] if b not in have))" "${backbones[@]}")
  # shellcheck disable=SC2086
  [ -z "$missing" ] || $PY -m benchmarks.llactr_sweep --dataset "$dataset" "${flags[@]}" --backbones $missing \
    --field-table "$features/field" --search coordinate
  for b in "${backbones[@]}"; do
    local chosen
    chosen=$($PY -c "import json; c = json.load(open('$sweep'))['backbones']['$b']['chosen']
print(f\"method.llactr.lambda_loss={c['lambda_loss']} method.llactr.lambda_llm={c['lambda_llm']}\")")
    for table in "" _random; do
      # shellcheck disable=SC2086
      $PY -m benchmarks.quality --dataset "$dataset" "${flags[@]}" --backbones "$b" \
        --variant "llactr${table}_$suffix" method.name=llactr "method.llactr.field_table=runs/features/$data${table/_/-}/field" \
        $chosen method.llactr.fre_reduction=sum "method.llactr.adaptor=$adaptor"
    done
  done
  $PY -m benchmarks.compare --data "$data" --variants "llactr_$suffix" "llactr_random_$suffix" \
    --backbones "${backbones[@]}" --out "compare_${data}_llactr_$suffix"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_$suffix" --reference "llactr_random_$suffix" \
    --backbones "${backbones[@]}" --out "compare_${data}_llactr_${suffix}_vs_random"
}

# LLaCTR on the packaged decoder LLM's field table (issue 17) at the defaults of the MiniLM record (llactr):
# against the base, against MiniLM's table and against a random table of the decoder's width; $1 the model,
# $2 dataset, $3 prepared name, then the split flags. On 2 cores a SmolLM2 step of 64 questions takes ~80 s,
# so the fine-tuning takes batches of 16 and a 900 s budget.
llactr_llm() {
  local llm=$1 dataset=$2 data=$3 flags=("${@:4}")
  local fields=runs/models/$data-$llm-fields features=runs/features/$data-$llm
  llactr_tables "$dataset" "$data" "${flags[@]}"  # the data, and MiniLM's tables to compare with
  [ -f "runs/models/$llm/materialized.json" ] || $PY -m embedding_jobs.materialize --model "$llm" --out "runs/models/$llm"
  [ -f "$fields/report.json" ] || $PY -m embedding_jobs.field_finetune --dataset "runs/data/$data" \
    --model "runs/models/$llm" --out "$fields" --batch-size 16 --time-budget-s 900 --no-progress
  [ -f "$features/field/table.parquet" ] || $PY -m embedding_jobs.run --entity field --dataset "runs/data/$data" \
    --model "$fields" --out "$features" --no-progress
  [ -f "$features-untuned/field/table.parquet" ] || $PY -m embedding_jobs.run --entity field \
    --dataset "runs/data/$data" --model "runs/models/$llm" --out "$features-untuned" --no-progress
  [ -f "$features-random/field/table.parquet" ] || $PY -m benchmarks.random_field_table \
    --like "$features/field" --out "$features-random"
  [ -f "runs/features/$data-untuned/field/table.parquet" ] || $PY -m embedding_jobs.run --entity field \
    --dataset "runs/data/$data" --out "runs/features/$data-untuned" --no-progress
  llactr_pair "$dataset" "llactr_$llm" "$features" "" "${flags[@]}"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_$llm" "llactr_${llm}_random" llactr \
    --backbones deepfm dcnv2 --out "compare_${data}_llactr_$llm"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_$llm" --reference "llactr_${llm}_random" \
    --backbones deepfm dcnv2 --out "compare_${data}_llactr_${llm}_vs_random"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_$llm" --reference llactr \
    --backbones deepfm dcnv2 --out "compare_${data}_llactr_${llm}_vs_minilm"
  # the same with the field vectors centred (method.llactr.center_fields): does the decoder's anisotropy (all
  # its field pairs look alike) explain the gap to MiniLM and to the random table? (MiniLM's: llactr_centered)
  llactr_pair "$dataset" "llactr_$llm" "$features" _centered "${flags[@]}"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_${llm}_centered" "llactr_${llm}_random_centered" \
    llactr_centered --backbones deepfm dcnv2 --out "compare_${data}_llactr_${llm}_centered"
  $PY -m benchmarks.compare --data "$data" --variants "llactr_${llm}_centered" \
    --reference "llactr_${llm}_random_centered" --backbones deepfm dcnv2 --out "compare_${data}_llactr_${llm}_centered_vs_random"
  $PY -m benchmarks.field_similarity --dataset "runs/data/$data" --table "minilm=runs/features/$data/field" \
    --table "minilm-untuned=runs/features/$data-untuned/field" --table "$llm=$features/field" \
    --table "$llm-untuned=$features-untuned/field" --table "random=runs/features/$data-random/field" \
    --report "minilm=runs/models/$data-fields/report.json" --report "$llm=$fields/report.json"
}

# LLaCTR (default weights) with the field vectors centred, MiniLM's table against the random one: $1 dataset,
# $2 prepared name, then the split flags
llactr_centered() {
  local dataset=$1 data=$2 flags=("${@:3}")
  llactr_tables "$@"
  llactr_pair "$dataset" llactr "runs/features/$data" _centered "${flags[@]}"
  $PY -m benchmarks.compare --data "$data" --variants llactr_centered llactr_random_centered llactr llactr_random \
    --backbones deepfm dcnv2 --out "compare_${data}_llactr_centered"
  $PY -m benchmarks.compare --data "$data" --variants llactr_centered --reference llactr_random_centered \
    --backbones deepfm dcnv2 --out "compare_${data}_llactr_centered_vs_random"
}

# ELEC (gain network, students, the no-language-model control student), and the profile-text ablation
elec() {
  local dataset=$1 data=$2 flags=("${@:3}")
  $PY -m benchmarks.elec --dataset "$dataset" "${flags[@]}" --skip elec_student_alone elec_student_rep --ablations elec_gain_profile
  $PY -m benchmarks.compare --data "$data" --record "elec_$data" --backbones deepfm dcnv2 \
    --variants elec_gain elec_student_score elec_student_both control_student_score --out "compare_${data}_elec"
  $PY -m benchmarks.compare --data "$data" --record "elec_$data" --backbones deepfm dcnv2 \
    --variants elec_student_score --reference control_student_score --out "compare_${data}_elec_vs_control"
}

# ELEC's students distilled on the valid split's rows as well (labels unused: data.unlabeled_splits=[valid]),
# beside the students of the main record and their no-language-model controls; its own record
elec_unlabeled() {
  local dataset=$1 data=$2 flags=("${@:3}") record=elec_$2_unlabeled
  $PY -m benchmarks.elec --dataset "$dataset" "${flags[@]}" --record "$record" \
    --skip elec_student_alone elec_student_rep elec_student_both
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm dcnv2 --out "compare_${data}_elec_unlabeled" \
    --variants elec_gain elec_student_score control_student_score elec_student_unlabeled control_student_unlabeled
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm dcnv2 --variants elec_student_unlabeled \
    --reference control_student_unlabeled --out "compare_${data}_elec_unlabeled_vs_control"
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm dcnv2 --variants elec_student_unlabeled \
    --reference elec_student_score --out "compare_${data}_elec_unlabeled_vs_student"
}

# ELEC with the packaged decoder (SmolLM2-135M-Instruct) beside MiniLM, DeepFM: both adapted with the same budget,
# each with its gain network and score-distilled student; base and control are shared
elec_smollm2() {
  local dataset=$1 data=$2 flags=("${@:3}") record=elec_$2_smollm2
  $PY -m benchmarks.elec --dataset "$dataset" "${flags[@]}" --backbones deepfm --llm minilm smollm2 --record "$record" \
    --skip elec_student_alone elec_student_rep elec_student_both elec_student_unlabeled control_student_unlabeled \
    elec_student_rep_smollm2 elec_student_both_smollm2 elec_student_unlabeled_smollm2 \
    --ablations elec_gain_logit elec_gain_logit_smollm2
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --out "compare_${data}_elec_smollm2" \
    --variants elec_gain elec_gain_smollm2 elec_student_score elec_student_score_smollm2 control_student_score
  local v
  for v in elec_gain elec_student_score; do  # the decoder against MiniLM, the same kind of run
    $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants "${v}_smollm2" \
      --reference "$v" --out "compare_${data}_${v}_smollm2_vs_minilm"
  done
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants elec_student_score_smollm2 \
    --reference control_student_score --out "compare_${data}_elec_smollm2_vs_control"
  # late fusion (the default injection) on each model's vectors
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm \
    --variants elec_gain_logit elec_gain_logit_smollm2 --out "compare_${data}_elec_logit_smollm2"
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants elec_gain_logit_smollm2 \
    --reference elec_gain_logit --out "compare_${data}_elec_logit_smollm2_vs_minilm"
}

# The same on a dataset where one session cannot train MiniLM's side again (ML-1M: about two hours for SmolLM2's
# side alone on 2 cores): SmolLM2's runs only, paired by seed with MiniLM's runs of an earlier record ($3); compare
# refuses the pairing unless both records' base runs agree seed by seed
elec_smollm2_only() {
  local dataset=$1 data=$2 minilm=$3 flags=("${@:4}") record=elec_$2_smollm2
  $PY -m benchmarks.elec --dataset "$dataset" "${flags[@]}" --backbones deepfm --llm smollm2 --record "$record" \
    --skip elec_student_alone control_student_score control_student_unlabeled \
    elec_student_rep_smollm2 elec_student_both_smollm2 elec_student_unlabeled_smollm2 \
    --ablations elec_gain_logit_smollm2 elec_gain_random_smollm2 elec_gain_logit_random_smollm2
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --out "compare_${data}_elec_smollm2" \
    --variants elec_gain_smollm2 elec_student_score_smollm2 elec_gain_logit_smollm2 elec_gain_random_smollm2 \
    elec_gain_logit_random_smollm2
  # each gain network against its control: the same tables with random directions
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants elec_gain_smollm2 \
    --reference elec_gain_random_smollm2 --out "compare_${data}_elec_smollm2_vs_random"
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants elec_gain_logit_smollm2 \
    --reference elec_gain_logit_random_smollm2 --out "compare_${data}_elec_logit_smollm2_vs_random"
  local v
  for v in elec_gain elec_student_score control_student_score; do
    $PY -m benchmarks.compare --data "$data" --record "$record" --reference-record "$minilm" --backbones deepfm \
      --variants "elec_gain_smollm2" "elec_student_score_smollm2" --reference "$v" \
      --out "compare_${data}_elec_smollm2_vs_${v}"
  done
}

# ELEC's late fusion on MiniLM and its random-direction control, DeepFM, in a record of their own (beside
# elec_smollm2_only's SmolLM2 late fusion, paired by seed): $1 dataset, $2 prepared name, then the split flags
elec_logit() {
  local dataset=$1 data=$2 flags=("${@:3}") record=elec_$2_logit
  $PY -m benchmarks.elec --dataset "$dataset" "${flags[@]}" --backbones deepfm --record "$record" \
    --skip elec_gain elec_student_alone elec_student_score elec_student_rep elec_student_both control_student_score \
    elec_student_unlabeled control_student_unlabeled --ablations elec_gain_logit elec_gain_logit_random
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm \
    --variants elec_gain_logit elec_gain_logit_random --out "compare_${data}_elec_logit"
  $PY -m benchmarks.compare --data "$data" --record "$record" --backbones deepfm --variants elec_gain_logit \
    --reference elec_gain_logit_random --out "compare_${data}_elec_logit_vs_random"
  $PY -m benchmarks.compare --data "$data" --record "elec_${data}_smollm2" --reference-record "$record" \
    --backbones deepfm --variants elec_gain_logit_smollm2 --reference elec_gain_logit \
    --out "compare_${data}_elec_logit_smollm2_vs_minilm"
}

# SRP4CTR on ML-100K (the one dataset here with time-ordered histories): DIN, each pre-trained variant, and the
# same architectures without pre-training (pre-training runs train.epochs, 10 in the config, with early stopping)
srp4ctr() {
  # DeepFM's srp_both runs pre-train (one encoder per seed); every other pre-trained run fine-tunes from that
  # seed's encoder (method.srp4ctr.pretrained_run), so variants differ only in what they fine-tune
  local q="$PY -m benchmarks.quality --dataset ml-100k" from="method.srp4ctr.pretrained_run=runs/bench/ml100k_deepfm"
  $q --backbones deepfm --variant srp_both method.name=srp4ctr
  local runs=(din "method.name=din"
              srp_both "method.name=srp4ctr ${from}_srp_both_s{seed}"
              srp_both_nopre "method.name=srp4ctr method.srp4ctr.pretrain=false"
              srp_cross "method.name=srp4ctr method.srp4ctr.queries=0 ${from}_srp_both_s{seed}"
              srp_qformer "method.name=srp4ctr method.srp4ctr.cross=false ${from}_srp_both_s{seed}"
              srp_cross_nopre "method.name=srp4ctr method.srp4ctr.queries=0 method.srp4ctr.pretrain=false"
              srp_qformer_nopre "method.name=srp4ctr method.srp4ctr.cross=false method.srp4ctr.pretrain=false")
  for ((i = 0; i < ${#runs[@]}; i += 2)); do
    # shellcheck disable=SC2086
    $q --backbones deepfm dcnv2 --variant "${runs[i]}" ${runs[i + 1]}
  done
  $PY -m benchmarks.compare --data ml-100k --backbones deepfm dcnv2 --out compare_ml-100k_srp4ctr \
    --variants din srp_cross srp_qformer srp_both srp_cross_nopre srp_qformer_nopre srp_both_nopre
  for v in cross qformer both; do
    $PY -m benchmarks.compare --data ml-100k --backbones deepfm dcnv2 --variants "srp_$v" \
      --reference "srp_${v}_nopre" --out "compare_ml-100k_srp_${v}_vs_nopre"
  done
  $PY -m benchmarks.compare --data ml-100k --backbones deepfm dcnv2 --variants srp_cross srp_qformer srp_both \
    --reference din --out compare_ml-100k_srp_vs_din
  $PY -m benchmarks.srp4ctr_pretrain --dataset ml-100k --backbones deepfm
  $PY -m benchmarks.srp4ctr_cost --dataset ml-100k --backbone deepfm
  # a position as the sum of its embeddings (the default) or their concatenation, projected: its own encoder
  $q --backbones deepfm --variant srp_both_concat method.name=srp4ctr method.srp4ctr.combine=concat
  $q --backbones deepfm dcnv2 --variant srp_both_concat method.name=srp4ctr method.srp4ctr.combine=concat \
    "${from}_srp_both_concat_s{seed}"
  $PY -m benchmarks.compare --data ml-100k --backbones deepfm dcnv2 --variants srp_both_concat \
    --reference srp_both --out compare_ml-100k_srp_concat_vs_sum
}

# $1 a part's name, then a command: run it unless another part was asked for (ml-1m: every ml-1m* part)
on() { [ -z "$only" ] || [[ $1 == "$only"* ]] || return 0; "${@:2}"; }

case $what in
  base) base ;;
  srp4ctr) srp4ctr ;;
  llactr_tuned) llactr_tuned ml-1m ml-1m_cold-item full "deepfm dcnv2" --split cold_item
                llactr_tuned ml-1m ml-1m_cold-item scalar "deepfm dcnv2" --split cold_item ;;
  # every backbone with weights tuned per dataset (issue 18); a dataset's part alone: ml-100k, ml-1m (both
  # splits), ml-1m_cold-item
  llactr_tuned_all) on ml-100k llactr_tuned ml-100k ml-100k full "$ALL_BACKBONES"
                    on ml-1m_cold-item llactr_tuned ml-1m ml-1m_cold-item full "$ALL_BACKBONES" --split cold_item
                    on ml-1m_random llactr_tuned ml-1m ml-1m full "$ALL_BACKBONES" ;;
  llactr) llactr ml-100k ml-100k; llactr ml-1m ml-1m_cold-item --split cold_item ;;
  llactr_centered) on ml-100k llactr_centered ml-100k ml-100k
                   on ml-1m llactr_centered ml-1m ml-1m_cold-item --split cold_item ;;
  llactr_smollm2) on ml-100k llactr_llm smollm2 ml-100k ml-100k
                  on ml-1m llactr_llm smollm2 ml-1m ml-1m_cold-item --split cold_item ;;
  elec) elec ml-100k ml-100k; elec ml-1m ml-1m_cold-item --split cold_item ;;
  elec_unlabeled) on ml-1m elec_unlabeled ml-1m ml-1m_cold-item --split cold_item
                  on ml-100k elec_unlabeled ml-100k ml-100k ;;
  elec_logit) elec_logit ml-1m ml-1m_cold-item --split cold_item ;;
  elec_smollm2) on ml-100k elec_smollm2 ml-100k ml-100k
                on ml-1m elec_smollm2_only ml-1m ml-1m_cold-item elec_ml-1m_cold-item_unlabeled --split cold_item ;;
  all) base; llactr ml-100k ml-100k; llactr ml-1m ml-1m_cold-item --split cold_item
       llactr_tuned ml-1m ml-1m_cold-item full "deepfm dcnv2" --split cold_item
       llactr_tuned ml-1m ml-1m_cold-item scalar "deepfm dcnv2" --split cold_item
       elec ml-100k ml-100k; elec ml-1m ml-1m_cold-item --split cold_item
       llactr_centered ml-100k ml-100k; llactr_centered ml-1m ml-1m_cold-item --split cold_item
       llactr_llm smollm2 ml-100k ml-100k; llactr_llm smollm2 ml-1m ml-1m_cold-item --split cold_item
       elec_unlabeled ml-1m ml-1m_cold-item --split cold_item; elec_unlabeled ml-100k ml-100k
       elec_smollm2 ml-100k ml-100k
       elec_smollm2_only ml-1m ml-1m_cold-item elec_ml-1m_cold-item_unlabeled --split cold_item
       llactr_tuned ml-100k ml-100k full "$ALL_BACKBONES"
       elec_logit ml-1m ml-1m_cold-item --split cold_item ;;
  *) echo "usage: $0 [all|base|llactr|llactr_tuned|llactr_smollm2|llactr_centered|elec|elec_unlabeled|elec_smollm2|srp4ctr] [ml-100k|ml-1m]" >&2
     exit 2 ;;
esac
