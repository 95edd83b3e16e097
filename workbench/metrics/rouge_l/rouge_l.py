"""ROUGE-L F-measure of generations against references, as an `evaluate` module that loads offline
(the Hub's "rouge" module downloads its script). The longest common subsequence comes from Google's
`rouge_score` package, the scorer the Hub module wraps too."""

import datasets
import evaluate


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure (longest common subsequence of tokens), averaged over examples.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: list of str; references: list of str (one per prediction).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": sum(scores) / max(len(scores), 1), "rougeL_per_example": scores}
