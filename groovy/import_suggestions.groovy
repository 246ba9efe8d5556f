/**
 * Histo-UNet: import the fields to annotate next (step 09) into a QuPath project.
 *
 * Purpose
 *   For the current image, reads <suggestions>/<image name>.geojson (written by
 *   notebooks/09_suggest_regions.ipynb): rectangles named 'Review <rank>' where the model
 *   is least sure. Removes the suggestions an earlier import left (unclassified
 *   annotations named 'Review <n>'), adds the new ones LOCKED and WITHOUT a
 *   classification (so they cannot be mistaken for labels, and step 01 skips them), and
 *   saves the image data. Run it again after a new 09: it replaces, never duplicates.
 *   Annotate inside the rectangles with classified objects, then export the annotations
 *   as GeoJSON again (the rectangles may stay in the export).
 *
 * Inputs
 *   SUGGESTIONS_DIR/<name>.geojson: a GeoJSON FeatureCollection in full-resolution pixel
 *   coordinates; each feature an annotation rectangle with properties.name 'Review <rank>',
 *   no classification, measurements (suggestion rank, suggestion score, uncertainty,
 *   tissue fraction, predicted <class> fraction). <name> is the image name without its
 *   extension. Images without a file are skipped with one line.
 *
 * Outputs
 *   The image's objects in the project: earlier suggestions removed, the new ones added
 *   (locked, unclassified, their own colour), the image data saved.
 *
 * Tested with
 *   QuPath 0.5.1 and 0.7.0 (their GeoJSON reader, PathIO.readObjects, reads every file 09
 *   writes in strict mode: tests/test_suggest.py with ../shared/tools/qupath-check).
 *
 * How to run
 *   In QuPath: Automate > Script editor > open this file > Run (current image) or
 *   Run > Run for project (every image).
 *   Headless:  QuPath script -p project.qpproj groovy/import_suggestions.groovy
 *              (runs once per image of the project).
 */

import qupath.lib.io.PathIO

// ===================== USER SETTINGS =====================
// Folder of the suggestion files: absolute, or relative to the project folder.
String SUGGESTIONS_DIR = 'suggestions'
// Name prefix of the suggestions (notebook 09 writes 'Review <rank>').
String PREFIX = 'Review'
// Lock the imported rectangles so a click cannot move or resize them.
boolean LOCK = true
// =================== END USER SETTINGS ===================

def imageData = getCurrentImageData()
def entry = getProjectEntry()
if (imageData == null || entry == null) {
    throw new IllegalStateException('no project image is open; open a project image or run this script for the project')
}
String name = GeneralTools.stripExtension(entry.getImageName())
File base = new File(SUGGESTIONS_DIR)
if (!base.isAbsolute()) {
    base = new File(buildFilePath(PROJECT_BASE_DIR, SUGGESTIONS_DIR))
}
if (!base.isDirectory()) {
    throw new FileNotFoundException("${base}: no suggestions folder; run notebook 09_suggest_regions or set SUGGESTIONS_DIR")
}
File geojson = new File(base, name + '.geojson')
if (!geojson.isFile()) {
    println "SKIP ${entry.getImageName()}: ${geojson} not found (09 suggested no field on this slide)"
    return
}

def isSuggestion = { obj ->
    obj.isAnnotation() && obj.getPathClass() == null && obj.getName() != null &&
        obj.getName().matches(java.util.regex.Pattern.quote(PREFIX) + ' [0-9]+')
}
def imported
try {
    imported = PathIO.readObjects(geojson)
} catch (Exception e) {
    throw new IOException("${geojson}: QuPath cannot read it (${e.getMessage()}); run notebook 09_suggest_regions again", e)
}
def classified = imported.findAll { it.getPathClass() != null }
if (!classified.isEmpty()) {
    throw new IllegalArgumentException("${geojson}: ${classified.size()} object(s) carry a classification; suggestions " +
        'must be unclassified (they are not labels): write them again with notebook 09_suggest_regions')
}
def bad = imported.findAll { !isSuggestion(it) }
if (!bad.isEmpty()) {
    throw new IllegalArgumentException("${geojson}: ${bad.size()} object(s) are not '${PREFIX} <rank>' annotations; " +
        'this is not a suggestions file of notebook 09_suggest_regions')
}
imported.each { it.setLocked(LOCK) }

def hierarchy = imageData.getHierarchy()
def old = hierarchy.getAnnotationObjects().findAll { isSuggestion(it) }
hierarchy.removeObjects(old, true)
hierarchy.addObjects(imported)
entry.saveImageData(imageData)

println "Imported ${imported.size()} suggestions into ${entry.getImageName()} from ${geojson} (removed ${old.size()} earlier ones)"
